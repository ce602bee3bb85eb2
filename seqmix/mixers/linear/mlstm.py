"""mLSTM block of xLSTM (Beck et al., "xLSTM: Extended Long Short-Term Memory", NeurIPS 2024),
the pre-up-projection block, through `seqmix.ops.mlstm.mlstm`.

    [x_m, z] = x W_up                                  up-projection by proj_factor (2) each
    c = silu(ShortConv(x_m))                            causal depthwise conv, 4 taps
    q = c W_q,  k = c W_k,  v = x_m W_v                 block-diagonal (blocks of 4 channels)
    ĩ, f̃ = [q, k, v] W_i + b_i, [q, k, v] W_f + b_f      gate pre-activations, one per head
    h = mLSTM(q, k, v, ĩ, f̃)                            exponential input gate, sigmoid forget
    y = W_down ((LN_H(h) + s ⊙ c) ⊙ silu(z))           head-wise norm, learnable skip s

Initialisation as the NX-AI `xlstm` package (`mLSTMLayer`, `mLSTMCell`): W_up and the q/k/v
blocks N(0, 2/(5D)) ("small init", D the block's embedding width), W_down N(0, (2/(n_layers
sqrt(D)))²) ("wang init"), gate weights zero, forget bias linspace(3, 6) over the heads (the
memory starts long-lived), input bias N(0, 0.1²), skip s = 1, norm scale 1 (no bias), conv as
PyTorch's default. The inner width is proj_factor·D rounded up to a multiple of
`round_proj_to` (64 in xLSTM).

Packed documents: the forget-gate pre-activation is −inf at a document's first token (a reset
of C, n and the stabiliser's contribution); the short conv masks its taps across documents.
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.norms import LayerNorm
from seqmix.mixers.common.short_conv import ShortConv, ShortConvCache
from seqmix.parallel import axes
from seqmix.parallel import dispatch


class MLSTMCache(NamedTuple):
  conv: ShortConvCache  # the short conv's last L−1 inputs (x_m)
  c: jax.Array          # [B, H, K, V] float32 stabilised matrix memory
  n: jax.Array          # [B, H, K] float32 stabilised normaliser
  m: jax.Array          # [B, H] float32 stabiliser
  seg: jax.Array        # [B] int32 segment id of the last token seen


def _linspace_init(start: float, stop: float):
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.linspace(start, stop, shape[0], dtype=jnp.float32).astype(dtype)
  return init


@registry.register(
    "mlstm", paper="xLSTM: Extended Long Short-Term Memory", year=2024, venue="NeurIPS",
    family="linear-rnn", op="mlstm.mlstm + conv.causal_conv",
    parents=("lstm", "linear_transformer"),
    constant_state=True, test_kwargs={"num_heads": 2, "round_proj_to": 16},
    sequence_parallel=True)
class MLSTM(MixerBase):
  """xLSTM mLSTM block (pre-up-projection).  x [B, T, D] -> y [B, T, D].

  num_heads: H heads of the mLSTM cell over the inner width (4).
  proj_factor: inner width E = proj_factor·D before rounding (2).
  round_proj_to: E is rounded up to a multiple of this (64).
  conv_kernel_size: taps L of the causal conv on the q/k path (4).
  qkv_proj_blocksize: channels per block of the block-diagonal q/k/v projections (4).
  use_bias: biases on the up/down and q/k/v projections (xLSTM: False).
  norm_eps: eps of the head-wise LayerNorm (1e-5).
  eps: eps of the mLSTM output denominator (1e-6).
  chunk_size, impl: passed to `mlstm.mlstm`; conv_impl to `conv.causal_conv`.
  """
  num_heads: int = 4
  proj_factor: float = 2.0
  round_proj_to: int = 64
  conv_kernel_size: int = 4
  qkv_proj_blocksize: int = 4
  use_bias: bool = False
  norm_eps: float = 1e-5
  eps: float = 1e-6
  chunk_size: int = 64
  impl: str = "auto"
  conv_impl: str = "auto"

  def _inner(self):
    if self.proj_factor <= 0 or self.round_proj_to < 1:
      raise ValueError(f"mlstm: proj_factor={self.proj_factor} and round_proj_to="
                       f"{self.round_proj_to} must be positive (xLSTM: 2 and 64).")
    e = self.round_proj_to * math.ceil(self.proj_factor * self.d_model / self.round_proj_to)
    check_divisible("inner width (proj_factor·d_model rounded to round_proj_to)", e,
                    self.num_heads, "num_heads")
    check_divisible("inner width (proj_factor·d_model rounded to round_proj_to)", e,
                    self.qkv_proj_blocksize, "qkv_proj_blocksize")
    return e

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> MLSTMCache:
    del max_len
    e = self._inner()
    h, dk = self.num_heads, e // self.num_heads
    l1 = self.conv_kernel_size - 1
    conv = ShortConvCache(jnp.zeros((batch_size, l1, e), dtype),
                          jnp.full((batch_size, l1), -1, jnp.int32))
    return MLSTMCache(conv, jnp.zeros((batch_size, h, dk, dk), jnp.float32),
                      jnp.zeros((batch_size, h, dk), jnp.float32),
                      jnp.zeros((batch_size, h), jnp.float32),
                      jnp.full((batch_size,), -1, jnp.int32))

  def _headwise(self, x, name):
    """Block-diagonal projection: x [B, T, E] -> [B, T, E] with E/blocksize blocks."""
    e = x.shape[-1]
    nb, bs = e // self.qkv_proj_blocksize, self.qkv_proj_blocksize
    w = self.param(name, axes.param(nn.initializers.normal(math.sqrt(2 / (5 * self.d_model))),
                                    axes.HEADS, axes.NONE, axes.NONE), (nb, bs, bs),
                   self.param_dtype)
    xb = x.reshape(*x.shape[:-1], nb, bs)                                # [b, t, nb, bs]
    y = jnp.einsum("btni,nio->btno", xb, w.astype(self.dtype)).reshape(x.shape)  # [b, t, e]
    if self.use_bias:
      y = y + self.param(name + "_bias", axes.param(nn.initializers.zeros, axes.HEADS), (e,),
                         self.param_dtype).astype(self.dtype)
    return y

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], MLSTMCache | None)."""
    del positions, deterministic
    e = self._inner()
    b, t, d = x.shape
    h = self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    small = nn.initializers.normal(math.sqrt(2 / (5 * d)))
    wang = nn.initializers.normal(2 / self.n_layers / math.sqrt(d))
    up = nn.Dense(2 * e, use_bias=self.use_bias, name="proj_up", **kw,
                  kernel_init=axes.param(small, axes.EMBED, axes.HEADS),
                  bias_init=axes.param(nn.initializers.zeros, axes.HEADS))(x)
    xm, z = jnp.split(up, 2, axis=-1)                                    # [b, t, e] each
    c, conv_cache = ShortConv(e, self.conv_kernel_size, use_bias=True, activation="silu",
                              impl=self.conv_impl, axis=axes.HEADS, name="conv1d", **kw)(
                                  xm, segment_ids=segment_ids,
                                  cache=None if cache is None else cache.conv)
    q, k, v = self._headwise(c, "q_proj"), self._headwise(c, "k_proj"), self._headwise(xm,
                                                                                       "v_proj")
    qkv = jnp.concatenate([q, k, v], axis=-1)                            # [b, t, 3e]
    gate = lambda name, bias_init: nn.Dense(
        h, use_bias=True, name=name, **kw,
        kernel_init=axes.param(nn.initializers.zeros, axes.HEADS, axes.NONE),
        bias_init=axes.param(bias_init, axes.NONE))(qkv).astype(jnp.float32)  # [b, t, h]
    i_pre = gate("igate", nn.initializers.normal(0.1))
    f_pre = gate("fgate", _linspace_init(3.0, 6.0))
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    f_pre = segments.reset_log_gate(f_pre, starts)
    heads = lambda a: a.reshape(b, t, h, e // h)                         # [b, t, h, k]
    hs, (cs, ns, ms) = dispatch.mlstm(
        heads(q), heads(k), heads(v), i_pre, f_pre, eps=self.eps,
        initial_state=None if cache is None else (cache.c, cache.n, cache.m),
        chunk_size=self.chunk_size, impl=self.impl)                      # [b, t, h, k]
    hn = LayerNorm(eps=self.norm_eps, use_bias=False, use_scale=False, dtype=self.dtype)(hs)
    scale = self.param("outnorm_scale", axes.param(nn.initializers.ones, axes.HEADS), (e,),
                       self.param_dtype)
    hn = hn.reshape(b, t, e) * scale.astype(self.dtype)                  # [b, t, e]
    skip = self.param("learnable_skip", axes.param(nn.initializers.ones, axes.HEADS), (e,),
                      self.param_dtype)
    hn = (hn + skip.astype(self.dtype) * c) * jax.nn.silu(z)
    y = nn.Dense(d, use_bias=self.use_bias, name="proj_down", **kw,
                 kernel_init=axes.param(wang, axes.HEADS, axes.EMBED),
                 bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(hn)
    new_cache = None if cache is None else MLSTMCache(
        conv_cache, cs, ns, ms, segments.last_segment_id(segment_ids, b))
    return y, new_cache
