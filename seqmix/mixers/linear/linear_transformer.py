"""Linear Transformer: causal linear attention with the elu+1 feature map (Katharopoulos et al.,
"Transformers are RNNs", ICML 2020).

    φ(x) = elu(x) + 1
    y_t = Σ_{s<=t} φ(q_t)·φ(k_s) v_s / (Σ_{s<=t} φ(q_t)·φ(k_s) + eps)

Numerator and denominator come from ONE `linear_attention.gla` call (g=None, scale 1): v gets a
column of ones appended, so the state `[K, V+1]` carries Σ φ(k_s)ᵀ v_s in its first V columns and
the normaliser Σ φ(k_s) in the last. Packed documents reset the state with a `-inf` gate at
each document's first token (the only gate this mixer ever passes).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.parallel import axes
from seqmix.parallel import dispatch


class LinearTransformerCache(NamedTuple):
  state: jax.Array  # [B, H, K, V + 1] float32: Σ φ(k)ᵀ [v, 1]
  seg: jax.Array    # [B] int32 segment id of the last token seen


def elu_feature_map(x):
  """φ(x) = elu(x) + 1 > 0 (Katharopoulos et al., eq. 7)."""
  return jax.nn.elu(x) + 1.0


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
    return LinearTransformerCache(jnp.zeros((batch_size, self.num_heads, hd, hd + 1), jnp.float32),
                                  jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], LinearTransformerCache | None)."""
    del positions, deterministic
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    b, t, d = x.shape
    h = self.num_heads
    dense = lambda in_axis, out_axis, name: nn.Dense(
        d, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=axes.param(nn.initializers.lecun_normal(), in_axis, out_axis),
        bias_init=axes.param(nn.initializers.zeros, out_axis))
    x = x.astype(self.dtype)
    q, k, v = (dense(axes.EMBED, axes.HEADS, n)(x).reshape(b, t, h, -1)  # [b, t, h, d/h]
               for n in ("q_proj", "k_proj", "v_proj"))
    q, k = elu_feature_map(q), elu_feature_map(k)
    v1 = jnp.concatenate([v, jnp.ones((b, t, h, 1), v.dtype)], axis=-1)  # [b, t, h, d/h + 1]
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    g = segments.reset_log_gate(None, starts, shape=(b, t, h))
    o, state = dispatch.gla(q, k, v1, g, scale=1.0,
                            initial_state=None if cache is None else cache.state,
                            chunk_size=self.chunk_size, impl=self.impl)
    num, den = o[..., :-1].astype(jnp.float32), o[..., -1:].astype(jnp.float32)
    o = (num / (den + self.eps)).astype(self.dtype)                      # [b, t, h, d/h]
    y = dense(axes.HEADS, axes.EMBED, "o_proj")(o.reshape(b, t, d))
    new_cache = None if cache is None else LinearTransformerCache(
        state, segments.last_segment_id(segment_ids, b))
    return y, new_cache
