"""CoCA (Zhu et al. 2023, "CoCA: Fusing Position Embedding with Collinear Constrained
Attention in Transformers for Long Context Window Extending")."""

import jax
import jax.numpy as jnp

from seqmix.positional import rope
from seqmix.positional.base import PositionalComponent, register, rotate_half


@register("coca", paper="CoCA: Fusing Position Embedding with Collinear Constrained Attention "
          "in Transformers for Long Context Window Extending", year=2023, venue="arXiv",
          url="https://arxiv.org/abs/2309.08646", parents=("rope",))
class CoCA(PositionalComponent):
  """CoCA: every key is collinear with the query in each rotary plane, k_s^i = t_s^i q_n^i,
  with a non-negative magnitude t_s^i from the key projection, so RoPE's angle between them
  is the relative angle alone (no anomalous behaviour of the q/k angles at long range):

      t_s^i = relu((k_s^i + k_s^{i+R/2}) / 2) ≥ 0                 (i < R/2, plane i)
      logit(n, s) = Dh^−½ [ Σ_i t_s^i |q_n^i|² cos((n − s) θ_i) + Σ_{d ≥ R} q_n^d k_s^d ]

  |q_n^i|² = (q_n^i)² + (q_n^{i+R/2})². Applied as a rotation of derived vectors, so the
  cache holds k'_s and decoding equals the parallel form:
      q'_n = R(n θ) (|q_n^i|², 0)_i  ⊕ q_n^{rest},   k'_s = R(s θ) (t_s^i, 0)_i ⊕ k_s^{rest}
  (rotate-half layout, θ_i = rope_base^(−2i/R), R from rope_fraction). This is the paper's
  equation; the authors' code contracts Σ_d q_d (R_n q)_d (R_s t)_d instead, which is not
  a function of n − s alone: that form is not reproduced.
  """
  ROTATES = True

  def rotate(self, q, k, positions):
    r = rope.rotary_dim(q.shape[-1], self.rope_fraction)
    inv = rope.inverse_frequencies(r, self.rope_base)
    q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
    half = r // 2
    mag = q32[..., :half] ** 2 + q32[..., half:r] ** 2                     # [b, t, h, r/2]
    t = jax.nn.relu((k32[..., :half] + k32[..., half:r]) / 2)               # [b, t, g, r/2]
    qd = jnp.concatenate([mag, jnp.zeros_like(mag), q32[..., r:]], axis=-1)
    kd = jnp.concatenate([t, jnp.zeros_like(t), k32[..., r:]], axis=-1)
    return (rotate_half(qd, positions, inv).astype(q.dtype),
            rotate_half(kd, positions, inv).astype(k.dtype))
