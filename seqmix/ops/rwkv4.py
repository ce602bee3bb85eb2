"""RWKV-4's WKV: a per-channel exponentially decaying softmax-like average of values.

    wkv(w, u, k, v, *, initial_state=None, chunk_size=16, impl="auto") -> (out, state)

Per channel, with decay `w <= 0` (RWKV-4's `-exp(time_decay)`) and bonus `u` (`time_first`):

    out_t = (Σ_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
          / (Σ_{i<t} e^{(t-1-i) w + k_i}     + e^{u + k_t})

(Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era", eq. 14-16). The state is
`WKVState(a, b, p)`, each [B, D] float32: the numerator and denominator sums over i < t scaled
by `e^{-p}`, with `p` the running maximum exponent (the stabiliser of the official CUDA kernel),
so nothing overflows for any k. The empty state is `a = b = 0, p = -1e38` (the kernel's
MIN_VALUE; a finite stand-in for -inf keeps `p - max(...)` free of inf - inf).

Impls (exact names):
  reference  the official stabilised recurrence as a token-by-token `lax.scan` in float32;
             the oracle.
  chunked    log-space chunks: inside a chunk of C = `chunk_size` steps the weights
             e^{(j-1-i) w + k_i - m_j} form a [B, C, C, D] lower-triangular matrix (row max m_j
             taken with the carried state's e^{j w + p}), and a `lax.scan` carries the state
             between chunks. The chunk body is rematerialised (`jax.checkpoint`), so memory
             stays O(B T D). A ragged T is padded at the front with k = -1e38 tokens (weight 0),
             and the first chunk's state decays count from its first real token.
  pallas     not built.

`auto` resolves to `chunked` on every platform, with a default chunk of 16: the chunk work is
O(C) per token, so small chunks pay. CPU measurement (2 shared, loaded cores; jit fwd+bwd of
`sum(out)`, B=2 T=2048 D=256 float32, median of 5): reference 283 ms, chunked C=16 77 ms,
C=32 120 ms, C=64 1436 ms. The GPU choice is for the benchmark in `experiments/bench/`.
Outputs are in the dtype of `v`.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.ops import _chunk
from seqmix.ops._impl import resolve

IMPLS = {"reference": True, "chunked": True, "pallas": False}
AUTO = {"default": "chunked"}

# The official kernel's MIN_VALUE: the log of an empty sum.
EMPTY_LOG = -1e38
# Decays below this (down to -inf, a full reset every step) are clamped: (chunk lag 0) * -inf
# would be NaN, and 128 * -1e30 still leaves room above EMPTY_LOG.
W_FLOOR = -1e30


class WKVState(NamedTuple):
  """RWKV-4 WKV state; each field [B, D] float32: numerator a·e^p, denominator b·e^p."""
  a: jax.Array
  b: jax.Array
  p: jax.Array


def empty_state(batch: int, dim: int) -> WKVState:
  zeros = jnp.zeros((batch, dim), jnp.float32)
  return WKVState(zeros, zeros, jnp.full((batch, dim), EMPTY_LOG, jnp.float32))


def _max_along(x, axis):
  """max over `axis` whose gradient reaches the winning entry even under rematerialisation.

  `jnp.max`'s gradient marks entries equal to the forward result; when `jax.checkpoint`
  recomputes the operand in a differently fused kernel, a 1-ulp difference loses the gradient.
  """
  idx = jnp.argmax(x, axis=axis, keepdims=True)
  return jnp.squeeze(jnp.take_along_axis(x, idx, axis=axis), axis)


def _reference(w, u, k, v, state):
  def step(s, kv):
    a, b, p = s
    k_t, v_t = kv  # [b, d]
    bonus = u + k_t
    m = jnp.maximum(p, bonus)
    e_state, e_now = jnp.exp(p - m), jnp.exp(bonus - m)
    out = (e_state * a + e_now * v_t) / (e_state * b + e_now)
    decayed = w + p
    p_new = jnp.maximum(decayed, k_t)
    e_state, e_now = jnp.exp(decayed - p_new), jnp.exp(k_t - p_new)
    return WKVState(e_state * a + e_now * v_t, e_state * b + e_now, p_new), out

  state, out = lax.scan(step, state, (jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0)))
  return jnp.moveaxis(out, 0, 1), state  # [b, t, d]


def _chunked(w, u, k, v, state, chunk_size):
  t = k.shape[1]
  c = min(int(chunk_size), t)
  pad = (-t) % c
  # Front padding with zero-weight tokens (k = -1e38); the first chunk's state-decay exponents
  # count from its first real token (`first`), so padding adds no large offset to cancel.
  widths = ((0, 0), (pad, 0), (0, 0))
  k = jnp.pad(k, widths, constant_values=EMPTY_LOG)
  v = jnp.pad(v, widths)
  n_chunks = (t + pad) // c
  first = jnp.zeros((n_chunks,), jnp.float32).at[0].set(pad)
  j = jnp.arange(c, dtype=jnp.float32)
  lag = j[:, None] - 1.0 - j[None, :]  # [j, i]: steps of decay from token i to output j
  strictly_lower = lag >= 0

  @jax.checkpoint
  def chunk(s, inp):
    a, b, p = s  # [b, d]
    k_c, v_c, first_c = inp  # [b, c, d], [b, c, d], []
    # Exponents of every source of output j: earlier tokens, token j (bonus u), the state.
    pair = jnp.where(strictly_lower[None, :, :, None],
                     lag[None, :, :, None] * w + k_c[:, None, :, :], EMPTY_LOG)  # [b, j, i, d]
    pair = jnp.where(jnp.eye(c, dtype=bool)[None, :, :, None], u + k_c[:, None, :, :], pair)
    state_lag = jnp.maximum(j - first_c, 0.0)  # padded rows (j < first) are discarded
    from_state = state_lag[None, :, None] * w + p[:, None, :]  # [b, j, d]
    # out does not depend on the stabiliser m (it cancels between num and den): no gradient.
    m = lax.stop_gradient(jnp.maximum(jnp.max(pair, axis=2), from_state))  # [b, j, d]
    weights = jnp.exp(pair - m[:, :, None, :])  # [b, j, i, d]
    e_state = jnp.exp(from_state - m)  # [b, j, d]
    num = jnp.einsum("bjid,bid->bjd", weights, v_c) + e_state * a[:, None]
    den = jnp.sum(weights, axis=2) + e_state * b[:, None]
    # The state after the chunk: every token decayed to the chunk end, and the old state.
    end = (c - 1.0 - j)[None, :, None] * w + k_c  # [b, i, d]
    end_state = (c - first_c) * w + p  # [b, d]
    p_new = jnp.maximum(_max_along(end, axis=1), end_state)
    e_end = jnp.exp(end - p_new[:, None])  # [b, i, d]
    e_state = jnp.exp(end_state - p_new)
    a_new = jnp.sum(e_end * v_c, axis=1) + e_state * a
    b_new = jnp.sum(e_end, axis=1) + e_state * b
    return WKVState(a_new, b_new, p_new), num / den

  # [b, t, d] -> [n_chunks, b, c, d]
  xs = tuple(jnp.moveaxis(_chunk.to_chunks(x, c), 1, 0) for x in (k, v))
  state, out = lax.scan(chunk, state, xs + (first,))
  out = _chunk.from_chunks(jnp.moveaxis(out, 0, 1))  # [b, t_padded, d]
  return out[:, pad:], state


@functools.partial(jax.jit, static_argnames=("chunk_size", "impl"))
def wkv(w, u, k, v, *, initial_state=None, chunk_size: int = 16, impl: str = "auto"):
  """RWKV-4 WKV (module docstring).

  Args:
    w: [D] log decay per channel, <= 0 (RWKV-4 passes -exp(time_decay)); -inf allowed
      (clamped to W_FLOOR: no memory beyond one step).
    u: [D] bonus for the current token (time_first).
    k: [B, T, D] keys (exponents; any magnitude).
    v: [B, T, D] values.
    initial_state: WKVState (or a tuple (a, b, p)) of [B, D] arrays; empty if None.
    chunk_size: steps per chunk for impl="chunked".
    impl: "reference" | "chunked" | "auto" ("pallas" is not built).

  Returns:
    (out [B, T, D] in v's dtype, WKVState of [B, D] float32).
  """
  impl = resolve("rwkv4.wkv", impl, IMPLS, AUTO)
  if k.ndim != 3 or v.shape != k.shape:
    raise ValueError(f"rwkv4.wkv: k and v must both be [B, T, D]; got {k.shape=}, {v.shape=}.")
  bsz, t, d = k.shape
  if w.shape != (d,) or u.shape != (d,):
    raise ValueError(f"rwkv4.wkv: w and u must be [D] = ({d},); got {w.shape=}, {u.shape=}.")
  if chunk_size < 1:
    raise ValueError(f"rwkv4.wkv: chunk_size must be a positive int; got {chunk_size}.")
  if initial_state is None:
    state = empty_state(bsz, d)
  else:
    state = WKVState(*(jnp.asarray(s, jnp.float32) for s in initial_state))
    if any(s.shape != (bsz, d) for s in state):
      raise ValueError(f"rwkv4.wkv: initial_state fields must be [B, D] = {(bsz, d)}; got "
                       f"{[s.shape for s in state]}.")
  if t == 0:
    return jnp.zeros(v.shape, v.dtype), state
  f32 = jnp.float32
  w = jnp.maximum(w.astype(f32), W_FLOOR)
  args = (w, u.astype(f32), k.astype(f32), v.astype(f32), state)
  if impl == "reference":
    out, state = _reference(*args)
  else:
    out, state = _chunked(*args, chunk_size)
  return out.astype(v.dtype), state
