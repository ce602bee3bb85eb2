"""Hawk: Griffin's recurrent block (De et al., "Griffin: Mixing Gated Linear Recurrences with
Local Attention for Efficient Language Models", arXiv 2024), as recurrentgemma's
`RecurrentBlock`.

    y = GeLU(x W_y + b_y)                                gate branch   [B, T, W]
    u = RG-LRU(Conv1D_4(x W_x + b_x))                    recurrent branch (seqmix.mixers.rnn.rglru)
    out = (u ⊙ y) W_out + b_out                          [B, T, D]

W = lru_width (default d_model). GeLU is the tanh approximation (jax's default, as the reference).
Init as recurrentgemma: W_x, W_y ~ N(0, 1/D) (variance scaling, fan-in), W_out ~ N(0, (2/L)/W) with
L = n_layers (Griffin's `final_w_init_variance_scale = 2 / num_layers`), biases 0; the RG-LRU
as in `rglru`. Deviation: the 4-tap conv is the shared `ShortConv`, whose init is PyTorch's
U(±1/√4) (recurrentgemma draws N(0, 0.01/4)); it masks taps across documents as the reference.
A Hawk model is this block with a gated-GeLU MLP after it (the model's `mlp`).

Decoding keeps the conv's last 3 inputs and the RG-LRU state [B, W] float32. Document starts
(segment-id changes, and the stream's first token even without segment ids, as recurrentgemma's
`segment_pos == 0`) reset the state and take their input with normaliser 1.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.short_conv import ShortConv, ShortConvCache
from seqmix.mixers.rnn.rglru import RGLRU, check_radii
from seqmix.parallel import axes


class HawkCache(NamedTuple):
  conv: ShortConvCache  # the conv's last L−1 inputs [B, L−1, W] and their segment ids
  state: jax.Array      # [B, W] float32 RG-LRU state
  seg: jax.Array        # [B] int32 segment id of the last token seen (-1: none seen yet)


def _normal_fan_in(scale: float):
  return nn.initializers.variance_scaling(scale, "fan_in", "normal")


@registry.register(
    "hawk", paper="Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient "
    "Language Models", year=2024, venue="arXiv", family="linear-rnn", op="scan.linear_scan",
    parents=("lru",), constant_state=True, test_kwargs={"num_heads": 4},
    url="https://arxiv.org/abs/2402.19427", sequence_parallel=True)
class Hawk(MixerBase):
  """Hawk / Griffin recurrent block.  x [B, T, D] -> y [B, T, D].

  lru_width: W, width of the RG-LRU (None: d_model).
  num_heads: H, blocks of the RG-LRU's block-diagonal gates (W must be a multiple).
  conv_width: taps of the causal conv before the RG-LRU (4).
  c: RG-LRU gate exponent constant (8).
  min_rad, max_rad: init ring of the RG-LRU's a (0.9, 0.999; see `rglru`).
  impl, chunk_size: passed to `seqmix.ops.scan.linear_scan`; conv_impl to `conv.causal_conv`.
  """
  lru_width: int | None = None
  num_heads: int = 8
  conv_width: int = 4
  c: float = 8.0
  min_rad: float = 0.9
  max_rad: float = 0.999
  impl: str = "auto"
  chunk_size: int = 64
  conv_impl: str = "auto"

  def _width(self):
    w = self.lru_width or self.d_model
    if w < 1 or self.num_heads < 1:
      raise ValueError(f"hawk: lru_width={w} and num_heads={self.num_heads} must be >= 1.")
    check_divisible("lru_width", w, self.num_heads, "num_heads")
    if self.conv_width < 1:
      raise ValueError(f"hawk: conv_width={self.conv_width} must be >= 1 (Griffin uses 4).")
    if self.c <= 0:
      raise ValueError(f"hawk: c={self.c} must be > 0 (Griffin uses 8).")
    check_radii(self.min_rad, self.max_rad)
    return w

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> HawkCache:
    del max_len  # constant-size state
    w = self._width()
    l1 = self.conv_width - 1
    conv = ShortConvCache(jnp.zeros((batch_size, l1, w), dtype),
                          jnp.full((batch_size, l1), -1, jnp.int32))
    return HawkCache(conv, jnp.zeros((batch_size, w), jnp.float32),
                     jnp.full((batch_size,), -1, jnp.int32))

  @staticmethod
  def _starts(segment_ids, cache, bt):
    """[B, T] document starts. As recurrentgemma (reset where segment_pos == 0), the stream's
    first token is one even without segment ids: its input enters with normaliser 1."""
    last = None if cache is None else cache.seg
    if segment_ids is not None:
      return segments.segment_starts(segment_ids, cache_last_id=last)
    first = jnp.ones((bt[0],), bool) if last is None else last < 0      # nothing seen yet
    return jnp.zeros(bt, bool).at[:, 0].set(first)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], HawkCache | None)."""
    del positions, deterministic
    w = self._width()
    b = x.shape[0]
    x = x.astype(self.dtype)

    def dense(features, scale, in_axis, out_axis, name):
      return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                      kernel_init=axes.param(_normal_fan_in(scale), in_axis, out_axis),
                      bias_init=axes.param(nn.initializers.zeros, out_axis))

    y = jax.nn.gelu(dense(w, 1.0, axes.EMBED, axes.HEADS, "linear_y")(x))     # [b, t, w]
    u = dense(w, 1.0, axes.EMBED, axes.HEADS, "linear_x")(x)
    u, conv_cache = ShortConv(w, self.conv_width, use_bias=True, activation=None,
                              impl=self.conv_impl, axis=axes.HEADS, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="conv_1d")(
                                  u, segment_ids=segment_ids,
                                  cache=None if cache is None else cache.conv)
    starts = self._starts(segment_ids, cache, x.shape[:2])
    u, state = RGLRU(self.num_heads, c=self.c, min_rad=self.min_rad, max_rad=self.max_rad,
                     impl=self.impl, chunk_size=self.chunk_size, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="rg_lru")(
                         u, starts=starts, h0=None if cache is None else cache.state)
    out = dense(self.d_model, 2.0 / max(self.n_layers, 1), axes.HEADS, axes.EMBED,
                "linear_out")(u.astype(self.dtype) * y)
    new_cache = None if cache is None else HawkCache(
        conv_cache, state, segments.last_segment_id(segment_ids, b))
    return out, new_cache
