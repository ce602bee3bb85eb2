"""LightConv and DynamicConv (Wu et al., "Pay Less Attention with Lightweight and Dynamic
Convolutions", ICLR 2019), the decoder (causal) form of fairseq's LightConv layer.

Both:
    u = GLU(x W_1 + b_1) = a ⊙ σ(g),  (a, g) = split(x W_1 + b_1)            [B, T, C], C = D
    y_t,c = Σ_{j=0}^{K-1} w_{h(c), j} · u_{t-K+1+j, c},  h(c) = c // (C/H)   K taps, H heads
    out = y W_2 + b_2

i.e. a causal depthwise conv whose C channels share the kernels of H heads (contiguous groups
of C/H channels, as fairseq's TBC kernels), with `k_s = w_{K-1-s}` in `causal_conv`'s layout.

LightConv: w = softmax_K(W) [H, K], one learned kernel per head (init Xavier-uniform).
DynamicConv: the kernel is predicted from the current step's input, w_t = softmax_K(u_t W_w +
b_w) [H, K], so the kernel changes per token (`seqmix.ops.conv.dynamic_causal_conv`).

Decoding: the cache holds the last K-1 inputs u (and their segment ids): KV <= K, constant
size. Packed documents: taps reading another document are masked (zeros, as the padding before
a sequence: the softmax is over all K taps in both cases, so a document alone and the same
document packed see the same kernel). Not built: weight dropout (DropConnect) and the
input/output dropouts (deterministic mixers).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import long_conv as lc
from seqmix.mixers.conv.hyena import check_int
from seqmix.ops import conv as conv_ops
from seqmix.parallel import axes


class _Base(MixerBase):
  """Fields and projections LightConv and DynamicConv share.

  kernel_size: K taps (the paper's decoders grow it with depth: 3, 7, 15, 31, 31, 31, 31).
  num_heads: H kernels shared by contiguous groups of D/H channels.
  conv_impl: `causal_conv` impl (LightConv).
  """
  kernel_size: int = 15
  num_heads: int = 8
  conv_impl: str = "auto"

  def _check(self):
    check_int("kernel_size", self.kernel_size, 1)
    check_int("num_heads", self.num_heads, 1)
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> lc.LongConvCache:
    del max_len  # the last K-1 inputs
    self._check()
    return lc.init_long_conv_cache(batch_size, self.kernel_size, self.d_model, dtype)

  def _glu_in(self, x):
    d = self.d_model
    ag = nn.Dense(2 * d, dtype=self.dtype, param_dtype=self.param_dtype, name="linear1",
                  kernel_init=axes.param(nn.initializers.xavier_uniform(), axes.EMBED,
                                         axes.HEADS),
                  bias_init=axes.param(nn.initializers.zeros, axes.HEADS))(x.astype(self.dtype))
    a, g = jnp.split(ag, 2, axis=-1)
    return a * jax.nn.sigmoid(g)                                             # [b, t, d]

  def _out(self, y):
    return nn.Dense(self.d_model, dtype=self.dtype, param_dtype=self.param_dtype, name="linear2",
                    kernel_init=axes.param(nn.initializers.xavier_uniform(), axes.HEADS,
                                           axes.EMBED),
                    bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(y)

  def _per_channel(self, w):
    """[..., H, K] head kernels -> [..., K, D] in causal_conv's layout (tap s = w_{K-1-s})."""
    w = jnp.repeat(w[..., ::-1], self.d_model // self.num_heads, axis=-2)   # [..., d, K]
    return jnp.swapaxes(w, -1, -2)

  def _dynamic_conv(self, u, k, segment_ids, cache):
    """y_t = Σ_s k_{t,s} ⊙ u_{t-s} with taps into other documents zeroed -> (y, cache | None).

    u [B, T, D]; k [B, T, K, D] float32 per-token kernels in causal_conv's layout.
    """
    b, t, _ = u.shape
    kk = k.shape[2]
    l1 = kk - 1
    if segment_ids is not None:
      seg = segment_ids.astype(jnp.int32)
      past_seg = jnp.full((b, l1), -1, jnp.int32) if cache is None else cache.seg
      full_seg = jnp.concatenate([past_seg, seg], axis=1)                     # [b, l1 + t]
      same = jnp.stack([full_seg[:, l1 - s:l1 - s + t] == seg for s in range(kk)], axis=2)
      k = jnp.where(same[..., None], k, 0.0)                                  # [b, t, K, d]
    y, state = conv_ops.dynamic_causal_conv(
        u, k.astype(u.dtype), initial_state=None if cache is None else cache.inputs.astype(u.dtype))
    if cache is None:
      return y, None
    new_seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
               else segment_ids.astype(jnp.int32))
    return y, lc.LongConvCache(state.astype(cache.inputs.dtype),
                               jnp.concatenate([cache.seg, new_seg], axis=1)[:, t:])


@registry.register(
    "lightconv", paper="Pay Less Attention with Lightweight and Dynamic Convolutions", year=2019,
    venue="ICLR", family="long-conv", op="conv.causal_conv (softmax-normalised head kernels)",
    parents=("mha",), constant_state=True,
    test_kwargs={"kernel_size": 4, "num_heads": 4})
class LightConv(_Base):
  """LightConv decoder layer.  x [B, T, D] -> y [B, T, D]."""

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], LongConvCache | None)."""
    del positions, deterministic
    self._check()
    u = self._glu_in(x)
    w = self.param("weight", axes.param(nn.initializers.xavier_uniform(), axes.NONE, axes.CONV),
                   (self.num_heads, self.kernel_size), self.param_dtype)
    k = self._per_channel(jax.nn.softmax(w.astype(jnp.float32), axis=-1))   # [K, d]
    y, new_cache = lc.long_conv(u, k, segment_ids=segment_ids, cache=cache, impl=self.conv_impl)
    return self._out(y), new_cache


@registry.register(
    "dynamicconv", paper="Pay Less Attention with Lightweight and Dynamic Convolutions",
    year=2019, venue="ICLR", family="long-conv",
    op="conv.dynamic_causal_conv (a softmax-normalised kernel predicted per token)",
    parents=("lightconv",), constant_state=True,
    test_kwargs={"kernel_size": 4, "num_heads": 4})
class DynamicConv(_Base):
  """DynamicConv decoder layer.  x [B, T, D] -> y [B, T, D]."""

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], LongConvCache | None)."""
    del positions, deterministic
    self._check()
    b, t, _ = x.shape
    h, kk = self.num_heads, self.kernel_size
    u = self._glu_in(x)
    logits = nn.Dense(h * kk, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="weight_linear",
                      kernel_init=axes.param(nn.initializers.xavier_uniform(), axes.HEADS,
                                             axes.CONV),
                      bias_init=axes.param(nn.initializers.zeros, axes.CONV))(u)
    w = jax.nn.softmax(logits.astype(jnp.float32).reshape(b, t, h, kk), axis=-1)
    k = self._per_channel(w)                                                  # [b, t, K, d]
    y, new_cache = self._dynamic_conv(u, k, segment_ids, cache)
    return self._out(y), new_cache
