"""RWKV-4 time mixing (Peng et al., "RWKV: Reinventing RNNs for the Transformer Era", EMNLP
Findings 2023), as the official RWKV-LM v4 `RWKV_TimeMix`.

    x'_t = x_{t-1}                                   token shift (0 at a document start)
    k = (μ_k x + (1 − μ_k) x') W_k,  v = (μ_v ...) W_v,  r = (μ_r ...) W_r      [B, T, A]
    wkv = WKV(w = −exp(time_decay), u = time_first, k, v)        (seqmix.ops.rwkv4.wkv)
    y = (σ(r) ⊙ wkv) W_o                                                         [B, T, D]

A = attention width (`dim_att`, default d_model). Initialisation as the official code, with
r0 = layer_idx / (n_layers − 1) and r1 = 1 − layer_idx / n_layers:
  time_decay[c] = −5 + 8 (c / (A − 1))^(0.7 + 1.3 r0)     (decay speeds, faster deeper)
  time_first[c] = ln 0.3 + 0.5 ((c + 1) mod 3 − 1)        ("zigzag" bonus)
  μ_k[i] = (i / D)^r1,  μ_v[i] = (i / D)^r1 + 0.3 r0,  μ_r[i] = (i / D)^(r1 / 2)
  W_k, W_r, W_o = 0 (the official `scale_init = 0`), W_v orthogonal.
The RWKV-4 block is this mixer plus the RWKV channel mix as the model's MLP.

Decoding keeps the token-shift input [B, D] and the WKV state (a, b, p) [B, A] float32.

Packed documents: the token shift is zeroed across a start, and the WKV state is emptied at a
start. The `wkv` op has no per-token reset (its decay is a constant per channel, so no gate
can carry one), so with `segment_ids` the mixer runs the op one token at a time inside a
`lax.scan`, emptying the state at starts; this is exact but sequential (the `chunked` form's
parallelism is lost for packed batches). A `reset` argument on the op would remove the slow
path.
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import segments
from seqmix.mixers.common.token_shift import (TokenShiftCache, init_token_shift_cache,
                                              token_shift)
from seqmix.ops import rwkv4 as wkv_ops
from seqmix.parallel import axes


class RWKV4Cache(NamedTuple):
  shift: TokenShiftCache   # previous token's input [B, D] and its segment id [B]
  wkv: wkv_ops.WKVState    # (a, b, p), each [B, A] float32


def _ratios(layer_idx: int, n_layers: int):
  """(r0 ∈ [0, 1] rising with depth, r1 ∈ (0, 1] falling), as the official init."""
  r0 = layer_idx / (n_layers - 1) if n_layers > 1 else 0.0
  r1 = 1.0 - layer_idx / n_layers
  return r0, r1


def time_decay_init(width: int, layer_idx: int, n_layers: int):
  """[A] official `time_decay`: −5 + 8 (c / (A − 1))^(0.7 + 1.3 r0)."""
  r0, _ = _ratios(layer_idx, n_layers)
  c = jnp.arange(width, dtype=jnp.float32) / max(width - 1, 1)
  return -5.0 + 8.0 * c ** (0.7 + 1.3 * r0)


def time_first_init(width: int):
  """[A] official `time_first`: ln 0.3 + 0.5 · ((c + 1) mod 3 − 1)."""
  zigzag = 0.5 * (((jnp.arange(width) + 1) % 3) - 1).astype(jnp.float32)
  return math.log(0.3) + zigzag


def time_mix_init(d_model: int, layer_idx: int, n_layers: int):
  """(μ_k, μ_v, μ_r), each [D], as the official init."""
  r0, r1 = _ratios(layer_idx, n_layers)
  ramp = jnp.arange(d_model, dtype=jnp.float32) / d_model
  return ramp ** r1, ramp ** r1 + 0.3 * r0, ramp ** (0.5 * r1)


def _const(value):
  return lambda key, shape, dtype=jnp.float32: jnp.asarray(value, dtype).reshape(shape)


@registry.register(
    "rwkv4", paper="RWKV: Reinventing RNNs for the Transformer Era", year=2023,
    venue="EMNLP Findings", family="linear-rnn", op="rwkv4.wkv", parents=("aft",),
    constant_state=True, test_kwargs={}, url="https://arxiv.org/abs/2305.13048")
class RWKV4(MixerBase):
  """RWKV-4 time mixing.  x [B, T, D] -> y [B, T, D].

  dim_att: A, width of k, v, r and the WKV (None: d_model, as the official models).
  impl: `seqmix.ops.rwkv4.wkv` impl ("reference" | "chunked" | "auto"); the impl named here is
    the impl run.
  chunk_size: WKV chunk length for impl="chunked" (the op's default 16).
  """
  dim_att: int | None = None
  impl: str = "auto"
  chunk_size: int = 16

  def _width(self) -> int:
    a = self.dim_att or self.d_model
    if a < 1:
      raise ValueError(f"rwkv4: dim_att={self.dim_att} must be >= 1 (or None for d_model).")
    if self.chunk_size < 1:
      raise ValueError(f"rwkv4: chunk_size={self.chunk_size} must be >= 1 (the op uses 16).")
    if not 0 <= self.layer_idx < max(self.n_layers, 1):
      raise ValueError(f"rwkv4: layer_idx={self.layer_idx} must be in [0, n_layers="
                       f"{self.n_layers}); the decay init depends on depth.")
    return a

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> RWKV4Cache:
    del max_len  # constant-size state
    return RWKV4Cache(init_token_shift_cache(batch_size, self.d_model, dtype),
                      wkv_ops.empty_state(batch_size, self._width()))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], RWKV4Cache | None). segment_ids [B,T]: packed documents."""
    del positions, deterministic
    a = self._width()
    b, t, d = x.shape
    x = x.astype(self.dtype)
    mu_k, mu_v, mu_r = time_mix_init(d, self.layer_idx, self.n_layers)
    vec = lambda name, init, n, ax: self.param(name, axes.param(init, ax), (n,), self.param_dtype)
    time_mix_k = vec("time_mix_k", _const(mu_k), d, axes.EMBED)
    time_mix_v = vec("time_mix_v", _const(mu_v), d, axes.EMBED)
    time_mix_r = vec("time_mix_r", _const(mu_r), d, axes.EMBED)
    time_decay = vec("time_decay", _const(time_decay_init(a, self.layer_idx, self.n_layers)), a,
                     axes.HEADS)
    time_first = vec("time_first", _const(time_first_init(a)), a, axes.HEADS)

    x_prev, shift_cache = token_shift(x, segment_ids=segment_ids,
                                      cache=None if cache is None else cache.shift)

    def mix(mu):
      mu = mu.astype(self.dtype)
      return x * mu + x_prev * (1.0 - mu)

    def dense(features, init, in_ax, out_ax, name):
      return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=axes.param(init, in_ax, out_ax), name=name)

    k = dense(a, nn.initializers.zeros, axes.EMBED, axes.HEADS, "key")(mix(time_mix_k))
    v = dense(a, nn.initializers.orthogonal(), axes.EMBED, axes.HEADS, "value")(mix(time_mix_v))
    r = dense(a, nn.initializers.zeros, axes.EMBED, axes.HEADS, "receptance")(mix(time_mix_r))

    w = -jnp.exp(time_decay.astype(jnp.float32))   # [a] log decay <= 0
    u = time_first.astype(jnp.float32)
    state = None if cache is None else cache.wkv
    last_id = None if cache is None else cache.shift.seg
    starts = segments.segment_starts(segment_ids, cache_last_id=last_id)   # [b, t] | None
    if starts is None:
      out, state = wkv_ops.wkv(w, u, k, v, initial_state=state, chunk_size=self.chunk_size,
                               impl=self.impl)
    else:
      out, state = self._wkv_with_resets(w, u, k, v, state, starts)

    y = dense(d, nn.initializers.zeros, axes.HEADS, axes.EMBED, "output")(
        jax.nn.sigmoid(r) * out.astype(self.dtype))
    new_cache = None if cache is None else RWKV4Cache(shift_cache, state)
    return y, new_cache

  def _wkv_with_resets(self, w, u, k, v, state, starts):
    """The op one token at a time, its state emptied where `starts` [B,T] is True.

    k, v [B,T,A] -> (out [B,T,A], WKVState).
    """
    b, _, a = k.shape
    empty = wkv_ops.empty_state(b, a)
    state = empty if state is None else wkv_ops.WKVState(*state)

    def step(s, inp):
      k_t, v_t, start = inp                                     # [b, a], [b, a], [b]
      s = wkv_ops.WKVState(*(jnp.where(start[:, None], e, f) for e, f in zip(empty, s)))
      o, s = wkv_ops.wkv(w, u, k_t[:, None], v_t[:, None], initial_state=s,
                         chunk_size=self.chunk_size, impl=self.impl)
      return s, o[:, 0]

    xs = (jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0), jnp.moveaxis(starts, 1, 0))  # [t, b, .]
    state, out = lax.scan(step, state, xs)
    return jnp.moveaxis(out, 0, 1), state                       # [b, t, a]
