"""xPos (Sun et al. 2023, "A Length-Extrapolatable Transformer")."""

import jax.numpy as jnp

from seqmix.positional import rope
from seqmix.positional.base import PositionalComponent, register, rotate_half


@register("xpos", paper="A Length-Extrapolatable Transformer", year=2023, venue="ACL",
          url="https://arxiv.org/abs/2212.10554", parents=("rope",))
class XPos(PositionalComponent):
  """xPos: RoPE times an exponential scale that decays with the query − key distance.

      q'_n = ζ^{ n/γ} ⊙ R(n θ) q_n,   k'_m = ζ^{−m/γ} ⊙ R(m θ) k_m
      q'_n · k'_m = Σ_i ζ_i^{(n−m)/γ} (rotated pair i's RoPE term)
      ζ_i = (2i + 0.4 R) / (1.4 R) ∈ [0.29, 1),  i = 0 .. R/2 − 1 (both channels of pair i)

  θ_i = rope_base^(−2i/R) on the R = 2·floor(rope_fraction·Dh/2) rotated channels (the
  rotate-half layout of seqmix.positional.rope; the rest pass unscaled); γ = `scale_base`
  (512). Keys are cached scaled, so decoding equals the parallel form. torchscale centres
  the positions of each call (n − T/2), which makes the scales depend on the call's length;
  here positions are absolute, so the product depends on n − m only and a decoded token
  equals its parallel self. The price: the scales grow as ζ_0^{∓n/γ} ≈ 3.5^{n/γ}, so in
  float32 keep n/γ ≲ 60 (positions up to ~30k at γ = 512), or offset positions per window.
  (The paper's blockwise causal attention at inference is a window: mha's `window`.)
  """
  scale_base: float = 512.0

  ROTATES = True

  def _zeta(self, r):
    return (jnp.arange(0, r, 2, dtype=jnp.float32) + 0.4 * r) / (1.4 * r)   # [r/2]

  def rotate(self, q, k, positions):
    r = rope.rotary_dim(q.shape[-1], self.rope_fraction)
    inv = rope.inverse_frequencies(r, self.rope_base)
    zeta = self._zeta(r)
    expo = positions.astype(jnp.float32)[..., None] / self.scale_base          # [b, t, 1]
    scale = jnp.power(zeta, expo)                                              # [b, t, r/2]
    ones = jnp.ones(scale.shape[:2] + (q.shape[-1] - r,), jnp.float32)

    def scaled(x, s):
      full = jnp.concatenate([s, s, ones], axis=-1)[:, :, None]               # [b, t, 1, dh]
      return (rotate_half(x, positions, inv) * full).astype(x.dtype)

    return scaled(q, scale), scaled(k, 1.0 / scale)
