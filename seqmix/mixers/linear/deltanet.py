"""DeltaNet (Schlag et al., "Linear Transformers Are Secretly Fast Weight Programmers", ICML 2021),
with the chunkwise-parallel training and layer of Yang et al., "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length" (NeurIPS 2024), through `seqmix.ops.delta_rule`.

    q, k, v = silu(ShortConv(x W_q)), silu(ShortConv(x W_k)), silu(ShortConv(x W_v))
    q, k = q / ‖q‖₂, k / ‖k‖₂   (per head);   β_t = sigmoid(x_t W_β)   [B, T, H]
    S_t = S_{t−1} + k_tᵀ (β_t (v_t − k_t S_{t−1})),   o_t = K^-1/2 · q_t S_t
    y = W_o RMSNorm_head(o)

Defaults and initialisation follow fla's `DeltaNet` layer and model: expand_k = expand_v = 1,
short convs of 4 taps without bias (one depthwise conv over [q, k, v] — the same maths as fla's
three), projections N(0, 0.02²), W_o PyTorch's default uniform scaled by 1/sqrt(2·n_layers)
(fla's "rescale" prenorm-residual init), per-head RMSNorm (scale [V] shared by the heads).

Packed documents: a −inf gate at a document's first token resets the state (g is None — pure
DeltaNet — when no segment ids are given); the short conv masks its taps across documents.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.norms import RMSNorm
from seqmix.mixers.common.short_conv import ShortConv, ShortConvCache
from seqmix.parallel import axes
from seqmix.parallel import dispatch

# fla's model init: every nn.Linear N(0, initializer_range² = 0.02²).
FLA_LINEAR_INIT = nn.initializers.normal(0.02)
L2_EPS = 1e-6  # fla's l2norm: x / sqrt(Σx² + 1e-6)


def l2_normalize(x, eps: float = L2_EPS):
  """x [..., K] / sqrt(Σ x² + eps) over the last axis, statistics in float32."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


def out_proj_init(n_layers: int):
  """PyTorch's nn.Linear default U(±1/sqrt(fan_in)) scaled by 1/sqrt(2·n_layers) (fla)."""
  return nn.initializers.variance_scaling(1.0 / 3.0 / (2 * n_layers), "fan_in", "uniform")


def delta_inputs(x, key_dim: int, value_dim: int, num_heads: int, *, conv_size: int,
                 conv_bias: bool, conv_impl: str, segment_ids, conv_cache, dtype, param_dtype):
  """The input path DeltaNet and Gated DeltaNet share, for use inside a compact `__call__` (its
  modules join the caller's: q_proj, k_proj, v_proj, conv1d, b_proj).

  x [B, T, D] -> q, k [B, T, H, Kh] (L2-normalised), v [B, T, H, Vh], beta [B, T, H] float32,
  and the short conv's new cache: q/k/v projections, one short causal conv + SiLU over
  [q; k; v], then β = sigmoid(x W_b).
  """
  b, t, _ = x.shape
  kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=axes.param(FLA_LINEAR_INIT, axes.EMBED, axes.HEADS))
  qkv = jnp.concatenate([nn.Dense(key_dim, name="q_proj", **kw)(x),
                         nn.Dense(key_dim, name="k_proj", **kw)(x),
                         nn.Dense(value_dim, name="v_proj", **kw)(x)], axis=-1)  # [b, t, 2k + v]
  qkv, conv_cache = ShortConv(
      2 * key_dim + value_dim, conv_size, use_bias=conv_bias, activation="silu",
      impl=conv_impl, axis=axes.HEADS, dtype=dtype, param_dtype=param_dtype,
      name="conv1d")(qkv, segment_ids=segment_ids, cache=conv_cache)
  q, k, v = jnp.split(qkv, [key_dim, 2 * key_dim], axis=-1)
  q = l2_normalize(q.reshape(b, t, num_heads, -1))                       # [b, t, h, k]
  k = l2_normalize(k.reshape(b, t, num_heads, -1))
  v = v.reshape(b, t, num_heads, -1)                                     # [b, t, h, v]
  beta = jax.nn.sigmoid(nn.Dense(num_heads, name="b_proj", **kw)(x).astype(jnp.float32))
  return q, k, v, beta, conv_cache


def delta_conv_cache(batch_size: int, conv_size: int, key_dim: int, value_dim: int,
                     dtype) -> ShortConvCache:
  """An empty cache of `delta_inputs`' short conv over [q; k; v]."""
  l1 = conv_size - 1
  return ShortConvCache(jnp.zeros((batch_size, l1, 2 * key_dim + value_dim), dtype),
                        jnp.full((batch_size, l1), -1, jnp.int32))


class DeltaNetCache(NamedTuple):
  conv: ShortConvCache  # the short conv's last L−1 inputs over [q, k, v]
  state: jax.Array      # [B, H, K, V] float32 fast weights
  seg: jax.Array        # [B] int32 segment id of the last token seen


@registry.register(
    "deltanet", paper="Linear Transformers Are Secretly Fast Weight Programmers", year=2021,
    venue="ICML", family="linear-attention", op="delta_rule.delta_rule + conv.causal_conv",
    parents=("linear_transformer", "fast_weights"), constant_state=True,
    test_kwargs={"num_heads": 2}, sequence_parallel=True)
class DeltaNet(MixerBase):
  """DeltaNet layer.  x [B, T, D] -> y [B, T, D].

  num_heads: H; key width expand_k·D and value width expand_v·D are split over the heads.
  expand_k, expand_v: key / value width over D (1, 1).
  conv_size: taps of the short convs on q, k, v (4). conv_bias: their bias (False).
  norm_eps: eps of the per-head output RMSNorm (1e-5).
  chunk_size, impl: passed to `delta_rule.delta_rule`; conv_impl to `conv.causal_conv`.
  """
  num_heads: int = 4
  expand_k: float = 1.0
  expand_v: float = 1.0
  conv_size: int = 4
  conv_bias: bool = False
  norm_eps: float = 1e-5
  chunk_size: int = 64
  impl: str = "auto"
  conv_impl: str = "auto"

  def _dims(self):
    key_dim, value_dim = int(self.d_model * self.expand_k), int(self.d_model * self.expand_v)
    check_divisible("key_dim (d_model·expand_k)", key_dim, self.num_heads, "num_heads")
    check_divisible("value_dim (d_model·expand_v)", value_dim, self.num_heads, "num_heads")
    return key_dim, value_dim

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> DeltaNetCache:
    del max_len
    key_dim, value_dim = self._dims()
    h = self.num_heads
    conv = delta_conv_cache(batch_size, self.conv_size, key_dim, value_dim, dtype)
    return DeltaNetCache(conv, jnp.zeros((batch_size, h, key_dim // h, value_dim // h),
                                         jnp.float32), jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], DeltaNetCache | None)."""
    del positions, deterministic
    key_dim, value_dim = self._dims()
    b, t, _ = x.shape
    h = self.num_heads
    x = x.astype(self.dtype)
    q, k, v, beta, conv_cache = delta_inputs(
        x, key_dim, value_dim, h, conv_size=self.conv_size, conv_bias=self.conv_bias,
        conv_impl=self.conv_impl, segment_ids=segment_ids,
        conv_cache=None if cache is None else cache.conv, dtype=self.dtype,
        param_dtype=self.param_dtype)
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    g = segments.reset_log_gate(None, starts, (b, t, h))
    o, state = dispatch.delta_rule(q, k, v, beta, g,
                                   initial_state=None if cache is None else cache.state,
                                   chunk_size=self.chunk_size, impl=self.impl)
    o = RMSNorm(eps=self.norm_eps, axis_name=axes.KV, dtype=self.dtype,
                param_dtype=self.param_dtype, name="o_norm")(o)          # [b, t, h, v]
    y = nn.Dense(self.d_model, name="o_proj", use_bias=False, dtype=self.dtype,
                 param_dtype=self.param_dtype, kernel_init=axes.param(
        out_proj_init(self.n_layers), axes.HEADS, axes.EMBED))(o.reshape(b, t, value_dim))
    new_cache = None if cache is None else DeltaNetCache(
        conv_cache, state, segments.last_segment_id(segment_ids, b))
    return y, new_cache
