"""Sandwich (Chi et al. 2023, "Dissecting Transformer Length Extrapolation via the Lens of
Receptive Field Analysis")."""

import jax.numpy as jnp

from seqmix.positional.base import PositionalComponent, register, relative_distance


@register("sandwich", paper="Dissecting Transformer Length Extrapolation via the Lens of "
          "Receptive Field Analysis", year=2023, venue="ACL",
          url="https://arxiv.org/abs/2212.10356", parents=("alibi", "kerple_log"))
class Sandwich(PositionalComponent):
  """Sandwich: a parameter-free bias, the inner product of sinusoidal embeddings,

      b_h(i, j) = ( Σ_{k=1}^{d'/2} cos((p_i − p_j) / 10000^{2k/d'}) − d'/2 ) / (8 h / H)

  h = 1 .. H (ALiBi's head-dependent compression; the dot product p_i·p_j of the sinusoid
  [sin, cos] embeddings is the sum of cosines of the distance). 0 at distance 0 and ≤ 0
  everywhere, decaying (with ripples) over distance; d' = `dim` (128).
  """
  dim: int = 128

  BIAS = True

  def bias(self, q, k, q_pos, k_pos, *, k_idx=None, visible=None):
    del q, k, k_idx, visible
    if self.dim < 2 or self.dim % 2:
      raise ValueError(f"sandwich: dim={self.dim} must be even and >= 2 (128 by default).")
    inv = 10000.0 ** (-2.0 * jnp.arange(1, self.dim // 2 + 1, dtype=jnp.float32) / self.dim)
    d = relative_distance(q_pos, k_pos)[..., None]                     # [b, 1, t, s, 1]
    dots = jnp.sum(jnp.cos(d * inv), axis=-1) - self.dim / 2           # [b, 1, t, s]
    h = jnp.arange(1, self.num_heads + 1, dtype=jnp.float32)
    return dots / (8.0 * h / self.num_heads)[None, :, None, None]      # [b, h, t, s]
