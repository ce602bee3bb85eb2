"""Resonance RoPE (Wang et al. 2024, "Resonance RoPE: Improving Context Length Generalization
of Large Language Models")."""

import jax.numpy as jnp
import numpy as np

from seqmix.positional import rope
from seqmix.positional.base import PositionalComponent, register, rotate_half


def resonance_frequencies(rot_dim: int, base: float = 10000.0):
  """θ̃ [R/2] float32: 2π / round(2π / θ_i), θ_i = base^(−2i/R) (wavelengths rounded)."""
  if base <= 1.0:
    raise ValueError(f"Resonance RoPE base={base} must be > 1 (10000 in the paper).")
  theta = base ** (-np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)  # host-side: static
  wavelength = np.maximum(np.round(2.0 * np.pi / theta), 1.0)
  return jnp.asarray(2.0 * np.pi / wavelength, jnp.float32)


@register("resonance", paper="Resonance RoPE: Improving Context Length Generalization of Large "
          "Language Models", year=2024, venue="ACL Findings",
          url="https://arxiv.org/abs/2403.00071", parents=("rope",))
class ResonanceRoPE(PositionalComponent):
  """Resonance RoPE: RoPE with every wavelength λ_i = 2π/θ_i rounded to an integer,

      θ̃_i = 2π / round(2π / θ_i),   q'_n = R(n θ̃) q_n,  k'_m = R(m θ̃) k_m

  so each rotated pair repeats exactly every round(λ_i) positions: a position past the
  training length shows a pair the same phases some trained position showed (no
  out-of-distribution phases for pairs whose wavelength is below the training length).
  θ_i = rope_base^(−2i/R) on R = 2·floor(rope_fraction·Dh/2) channels (rotate-half layout).
  Pair 0's wavelength 2π rounds to 6 (θ̃_0 = π/3). A wavelength rounding to 0 is kept at 1.
  """
  ROTATES = True

  def rotate(self, q, k, positions):
    r = rope.rotary_dim(q.shape[-1], self.rope_fraction)
    inv = resonance_frequencies(r, self.rope_base)
    return (rotate_half(q, positions, inv).astype(q.dtype),
            rotate_half(k, positions, inv).astype(k.dtype))
