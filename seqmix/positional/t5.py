"""T5 relative position bias (Raffel et al. 2020, "Exploring the Limits of Transfer Learning
with a Unified Text-to-Text Transformer"), causal (decoder, `bidirectional=False`) form."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from seqmix.parallel import axes
from seqmix.positional.base import PositionalComponent, register


def t5_buckets(distance, num_buckets: int = 32, max_distance: int = 128):
  """Causal T5 bucket of each query − key distance (int array; negatives -> bucket 0).

  n = max(distance, 0); n < B/2: bucket n (exact); else
  B/2 + floor(log(n / (B/2)) / log(max_distance / (B/2)) · (B − B/2)), capped at B − 1.
  """
  n = jnp.maximum(jnp.asarray(distance), 0)
  exact = num_buckets // 2
  nf = jnp.maximum(n, 1).astype(jnp.float32)
  large = exact + (jnp.log(nf / exact) / np.log(max_distance / exact)
                   * (num_buckets - exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return jnp.where(n < exact, n, large).astype(jnp.int32)


@register("t5", paper="Exploring the Limits of Transfer Learning with a Unified Text-to-Text "
          "Transformer", year=2020, venue="JMLR", url="https://arxiv.org/abs/1910.10683")
class T5Bias(PositionalComponent):
  """T5 relative bias: b_h(i, j) = E[bucket(p_i − p_j), h], a learned table E [B_n, H].

  bucket(n) = n for n < B_n/2 (exact near distances), then logarithmically spaced buckets up
  to `max_distance`, beyond which every distance shares bucket B_n − 1 (so the bias is
  constant past max_distance: it extrapolates as a constant). Causal: future distances
  (masked anyway) fall in bucket 0. Each mha layer owns its table (T5 shares one across
  layers; share it by tying parameters if wanted).

  num_buckets: B_n (32); max_distance: 128; init_stddev: std of the table's normal init.
  """
  num_buckets: int = 32
  max_distance: int = 128
  init_stddev: float = 0.1

  BIAS = True

  def setup(self):
    if self.num_buckets < 2 or self.max_distance <= self.num_buckets // 2:
      raise ValueError(f"t5: num_buckets={self.num_buckets} must be >= 2 and max_distance="
                       f"{self.max_distance} > num_buckets // 2 (defaults 32, 128).")
    self.table = self.param(
        "rel_bias", axes.param(nn.initializers.normal(self.init_stddev), axes.NONE, axes.HEADS),
        (self.num_buckets, self.num_heads), jnp.float32)

  def bias(self, q, k, q_pos, k_pos, *, k_idx=None, visible=None):
    del q, k, k_idx, visible
    d = q_pos.astype(jnp.int32)[:, :, None] - k_pos.astype(jnp.int32)[:, None, :]  # [b, t, s]
    e = jnp.take(self.table.astype(jnp.float32),
                 t5_buckets(d, self.num_buckets, self.max_distance), axis=0)     # [b, t, s, h]
    return jnp.moveaxis(e, -1, 1)                                                 # [b, h, t, s]
