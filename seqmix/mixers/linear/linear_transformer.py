"""Linear Transformer: causal linear attention with the elu+1 feature map (Katharopoulos et al.,
"Transformers are RNNs", ICML 2020).

    φ(x) = elu(x) + 1
    y_t = Σ_{s<=t} φ(q_t)·φ(k_s) v_s / (Σ_{s<=t} φ(q_t)·φ(k_s) + eps)

Numerator and denominator come from ONE `linear_attention.gla` call (g=None, scale 1): v gets a
column of ones appended, so the state `[K, V+1]` carries Σ φ(k_s)ᵀ v_s in its first V columns and
the normaliser Σ φ(k_s) in the last. Packed documents reset the state with a `-inf` gate at
each document's first token (the only gate this mixer ever passes).
"""

import flax.linen as nn
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import feature_maps
from seqmix.mixers.common.feature_maps import elu_feature_map
from seqmix.mixers.common.projections import sharded_dense
from seqmix.parallel import axes


LinearTransformerCache = feature_maps.FeatureMapCache  # state [B, H, K, V + 1], seg [B]


@registry.register(
    "linear_transformer", paper="Transformers are RNNs: Fast Autoregressive Transformers with "
    "Linear Attention", year=2020, venue="ICML", family="linear-attention",
    op="linear_attention.gla", parents=("mha",), constant_state=True,
    test_kwargs={"num_heads": 2}, needs_positions=True, sequence_parallel=True)
class LinearTransformer(MixerBase):
  """Causal linear attention, normalised.  x [B, T, D] -> y [B, T, D].

  num_heads: H; q, k, v have D/H channels per head.
  use_bias: biases on the q/k/v/output projections (the paper's attention layers have them).
  eps: added to the denominator (the paper's implementation uses 1e-6).
  chunk_size, impl: passed to `linear_attention.gla`.
  """
  num_heads: int = 4
  use_bias: bool = True
  eps: float = 1e-6
  chunk_size: int = 64
  impl: str = "auto"

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    del max_len, dtype  # constant-size float32 state
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    hd = self.d_model // self.num_heads
    return feature_maps.init_feature_map_cache(batch_size, self.num_heads, hd, hd)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], LinearTransformerCache | None)."""
    del positions, deterministic
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    b, t, d = x.shape
    h = self.num_heads
    dense = lambda in_axis, out_axis, name: sharded_dense(
        d, in_axis, out_axis, name, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    q, k, v = (dense(axes.EMBED, axes.HEADS, n)(x).reshape(b, t, h, -1)  # [b, t, h, d/h]
               for n in ("q_proj", "k_proj", "v_proj"))
    o, new_cache = feature_maps.normalized_linear_attention(
        elu_feature_map(q), elu_feature_map(k), v, eps=self.eps, segment_ids=segment_ids,
        cache=cache, chunk_size=self.chunk_size, impl=self.impl)         # [b, t, h, d/h]
    y = dense(axes.HEADS, axes.EMBED, "o_proj")(o.reshape(b, t, d))
    return y, new_cache
