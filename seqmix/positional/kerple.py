"""KERPLE (Chi et al. 2022, "KERPLE: Kernelized Relative Positional Embedding for Length
Extrapolation"): conditionally positive definite kernels of the distance as logit biases."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.parallel import axes
from seqmix.positional.base import PositionalComponent, register, relative_distance

# The reference implementation clamps both kernel parameters at 1e-2 after every step; here the
# clamp is applied where they are used (same values, and no parameter surgery in the trainer).
EPS = 1e-2


def _uniform(scale):
  def init(key, shape, dtype=jnp.float32):
    return scale * jax.random.uniform(key, shape, dtype)
  return init


class _Kerple(PositionalComponent):
  BIAS = True

  def setup(self):
    # Reference init: r1 ~ U(0, 2), r2 ~ U(0, 1), one per head.
    self.r1 = self.param("r1", axes.param(_uniform(2.0), axes.HEADS), (self.num_heads,),
                         jnp.float32)
    self.r2 = self.param("r2", axes.param(_uniform(1.0), axes.HEADS), (self.num_heads,),
                         jnp.float32)

  def _params(self):
    return (jnp.maximum(self.r1, EPS)[None, :, None, None],
            jnp.maximum(self.r2, EPS)[None, :, None, None])


@register("kerple_log", paper="KERPLE: Kernelized Relative Positional Embedding for Length "
          "Extrapolation", year=2022, venue="NeurIPS", url="https://arxiv.org/abs/2205.09921",
          parents=("alibi",))
class KerpleLog(_Kerple):
  """KERPLE, logarithmic kernel: b_h(i, j) = −r1_h · log(1 + r2_h · |p_i − p_j|),
  r1_h, r2_h > 0 learned per head (clamped at 1e-2, as the reference code does)."""

  def bias(self, q, k, q_pos, k_pos, *, k_idx=None, visible=None):
    del q, k, k_idx, visible
    r1, r2 = self._params()
    return -r1 * jnp.log1p(r2 * jnp.abs(relative_distance(q_pos, k_pos)))


@register("kerple_power", paper="KERPLE: Kernelized Relative Positional Embedding for Length "
          "Extrapolation", year=2022, venue="NeurIPS", url="https://arxiv.org/abs/2205.09921",
          parents=("alibi",))
class KerplePower(_Kerple):
  """KERPLE, power kernel: b_h(i, j) = −r1_h · |p_i − p_j|^{r2_h}, r1_h > 0 and
  0 < r2_h ≤ 2 learned per head (clamped to [1e-2, 2]; r2 = 1 is ALiBi with a learned slope).
  """

  def bias(self, q, k, q_pos, k_pos, *, k_idx=None, visible=None):
    del q, k, k_idx, visible
    r1, r2 = self._params()
    r2 = jnp.minimum(r2, 2.0)
    d = jnp.abs(relative_distance(q_pos, k_pos))
    # d^r2 with a finite gradient at d = 0 (d^r2 = exp(r2 log d) has ∂/∂r2 = d^r2 log d -> 0).
    safe = jnp.where(d > 0, d, 1.0)
    return -r1 * jnp.where(d > 0, safe ** r2, 0.0)
