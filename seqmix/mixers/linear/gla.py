"""GLA: gated linear attention with a data-dependent per-key forget gate (Yang et al., ICML 2024).

    α_t = logsigmoid(x_t W_a1 W_a2 + b_a) / gate_logit_normalizer      [B, T, H, K]  (log gate)
    S_t = diag(exp(α_t)) S_{t-1} + k_tᵀ v_t,    o_t = K^-1/2 · q_t S_t  (seqmix.ops.linear_attention.gla)
    y_t = W_o [RMSNorm_head(o_t) ⊙ swish(x_t W_g)]

The gate is a rank-16 projection (`seqmix.mixers.common.lowrank.LowRank`); dividing the
logsigmoid by 16 keeps the initial decays close to 1 (exp(-log 2 / 16) ≈ 0.96). Defaults follow
the paper and fla's `GatedLinearAttention` layer: expand_k 0.5, expand_v 1, output gate, group
RMSNorm per head (its scale `[V]` shared by the heads), Xavier-uniform projections with gain 2^-2.5.

Short convolution (option, fla's `use_short_conv`, default off as in fla and the paper): with
`use_short_conv=True`, q, k, v each pass a causal depthwise convolution of `conv_size` taps
followed by SiLU (fla: `ShortConvolution(..., activation='silu')`, bias `conv_bias`) before the
recurrence. Zoology-style recall studies give GLA this convolution: it lets one layer bind a
key to the value after it, which a per-token k_tᵀ v_t write cannot (README "MQAR").
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.lowrank import LowRank
from seqmix.mixers.common.norms import GatedRMSNorm, RMSNorm
from seqmix.mixers.common.short_conv import ShortConv, ShortConvCache
from seqmix.parallel import axes
from seqmix.parallel import dispatch

# fla's layer init: xavier_uniform_(gain=2 ** -2.5), i.e. variance scale gain² = 2^-5 over fan_avg.
FLA_INIT = nn.initializers.variance_scaling(2.0 ** -5, "fan_avg", "uniform")


class GLACache(NamedTuple):
  state: jax.Array  # [B, H, K, V] float32 recurrent state
  seg: jax.Array    # [B] int32 segment id of the last token seen
  conv: Optional[ShortConvCache] = None  # use_short_conv: the last L−1 inputs over [q, k, v]


@registry.register(
    "gla", paper="Gated Linear Attention Transformers with Hardware-Efficient Training",
    year=2024, venue="ICML", family="linear-attention", op="linear_attention.gla",
    parents=("linear_transformer", "retnet"), constant_state=True,
    test_kwargs={"num_heads": 2}, sequence_parallel=True)
class GLA(MixerBase):
  """Gated linear attention layer.  x [B, T, D] -> y [B, T, D].

  num_heads: H. key_dim = expand_k·D and value_dim = expand_v·D are split over the heads.
  expand_k: key width over D (paper: 0.5). expand_v: value width over D (paper: 1).
  gate_low_rank_dim: rank of the gate projection (16).
  gate_logit_normalizer: the log gate is logsigmoid(·) / this (16); larger means slower decay.
  use_output_gate: y = norm(o) ⊙ swish(x W_g) (True) or y = norm(o).
  norm_eps: eps of the per-head RMSNorm.
  use_short_conv: SiLU(causal depthwise conv) on q, k, v before the recurrence (False, as fla).
  conv_size: taps of that convolution (4). conv_bias: a bias in it (False, as fla).
  chunk_size, impl: passed to `linear_attention.gla`.
  """
  num_heads: int = 4
  expand_k: float = 0.5
  expand_v: float = 1.0
  gate_low_rank_dim: int = 16
  gate_logit_normalizer: float = 16.0
  use_output_gate: bool = True
  norm_eps: float = 1e-5
  use_short_conv: bool = False
  conv_size: int = 4
  conv_bias: bool = False
  chunk_size: int = 64
  impl: str = "auto"

  def _dims(self):
    key_dim, value_dim = int(self.d_model * self.expand_k), int(self.d_model * self.expand_v)
    check_divisible("key_dim (d_model·expand_k)", key_dim, self.num_heads, "num_heads")
    check_divisible("value_dim (d_model·expand_v)", value_dim, self.num_heads, "num_heads")
    if self.gate_logit_normalizer <= 0:
      raise ValueError(f"gate_logit_normalizer={self.gate_logit_normalizer} must be > 0 "
                       f"(the paper uses 16).")
    if self.use_short_conv and self.conv_size < 1:
      raise ValueError(f"gla: conv_size={self.conv_size} must be >= 1 with use_short_conv=True "
                       f"(fla uses 4).")
    return key_dim, value_dim

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> GLACache:
    del max_len, dtype  # constant-size float32 state
    key_dim, value_dim = self._dims()
    h = self.num_heads
    conv = None
    if self.use_short_conv:
      l1 = self.conv_size - 1
      conv = ShortConvCache(jnp.zeros((batch_size, l1, 2 * key_dim + value_dim), self.dtype),
                            jnp.full((batch_size, l1), -1, jnp.int32))
    return GLACache(jnp.zeros((batch_size, h, key_dim // h, value_dim // h), jnp.float32),
                    jnp.full((batch_size,), -1, jnp.int32), conv)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], GLACache | None)."""
    del positions, deterministic
    key_dim, value_dim = self._dims()
    b, t, _ = x.shape
    h = self.num_heads
    dense = lambda f, in_axis, out_axis, name: nn.Dense(
        f, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=axes.param(FLA_INIT, in_axis, out_axis))
    x = x.astype(self.dtype)
    q = dense(key_dim, axes.EMBED, axes.HEADS, "q_proj")(x)                # [b, t, key_dim]
    k = dense(key_dim, axes.EMBED, axes.HEADS, "k_proj")(x)
    v = dense(value_dim, axes.EMBED, axes.HEADS, "v_proj")(x)              # [b, t, value_dim]
    conv_cache = None
    if self.use_short_conv:  # one depthwise conv over [q; k; v] = three separate ones
      qkv, conv_cache = ShortConv(
          2 * key_dim + value_dim, self.conv_size, use_bias=self.conv_bias, activation="silu",
          axis=axes.HEADS, dtype=self.dtype, param_dtype=self.param_dtype, name="conv1d")(
              jnp.concatenate([q, k, v], axis=-1), segment_ids=segment_ids,
              cache=None if cache is None else cache.conv)
      q, k, v = jnp.split(qkv, [key_dim, 2 * key_dim], axis=-1)
    q, k = q.reshape(b, t, h, -1), k.reshape(b, t, h, -1)                  # [b, t, h, k]
    v = v.reshape(b, t, h, -1)                                             # [b, t, h, v]
    gate = LowRank(key_dim, self.gate_low_rank_dim, use_bias=True, down_init=FLA_INIT,
                   up_init=FLA_INIT, out_axis=axes.HEADS, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="gk_proj")(x)
    log_g = jax.nn.log_sigmoid(gate.astype(jnp.float32)) / self.gate_logit_normalizer
    log_g = log_g.reshape(b, t, h, -1)                                   # [b, t, h, k]
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    log_g = segments.reset_log_gate(log_g, starts)
    o, state = dispatch.gla(q, k, v, log_g,
                            initial_state=None if cache is None else cache.state,
                            chunk_size=self.chunk_size, impl=self.impl)
    norm_kw = dict(eps=self.norm_eps, axis_name=axes.KV, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="g_norm")
    if self.use_output_gate:
      g = dense(value_dim, axes.EMBED, axes.HEADS, "g_proj")(x).reshape(b, t, h, -1)
      o = GatedRMSNorm(norm_before_gate=True, **norm_kw)(o, g)          # [b, t, h, v]
    else:
      o = RMSNorm(**norm_kw)(o)
    y = dense(self.d_model, axes.HEADS, axes.EMBED, "o_proj")(o.reshape(b, t, value_dim))  # [b, t, d]
    new_cache = None if cache is None else GLACache(
        state, segments.last_segment_id(segment_ids, b), conv_cache)
    return y, new_cache
