"""The first-order linear recurrence `h_t = a_t * h_{t-1} + x_t` (LRU, RG-LRU, S4D recurrences).

    linear_scan(a, x, *, initial_state=None, chunk_size=64, impl="auto") -> (h, h_T)

`a` and `x` are `[B, T, ...]` with any trailing shape (they broadcast against each other),
real or complex. `a` may take any value: negative, zero (`a_t = 0` is a hard reset, which is
how mixers stop state crossing document boundaries), or complex with `|a| < 1` (LRU). No form
takes logs of `a`, so none assumes `a > 0`.

Impls (exact names):
  reference    token-by-token `lax.scan`; the oracle.
  associative  one `lax.associative_scan` over the whole sequence: log2(T) levels of
               elementwise work, but every level's `[B, T, ...]` intermediates are kept for
               the backward pass.
  chunked      a C-step `lax.scan` inside all chunks of C = `chunk_size` steps at once
               (zero-start local states and running products of `a`), a T/C-step scan over
               the chunk summaries (product of `a`, local final state), then one fix-up
               `h = h_local + (running product of a) * h_entering_chunk`. Sequential depth
               C + T/C instead of T, and no log2(T) levels of intermediates kept.
  pallas       a Pallas kernel (`kernels_pallas/linear_scan/`): one program per (batch row,
               block of channels) walks time with the state in registers, loading tiles of
               rows at once; `a` and `x` are read once and `h` written once, and the
               backward is the same kernel in reverse time. Trailing dims are flattened to
               one channel axis; complex runs as real and imaginary float32 parts.
               `chunk_size` does not apply. Compiled (Triton lowering) on GPU, interpret mode
               elsewhere (a CPU/TPU check of the same kernel body, not a fast path).

`auto` resolves to `reference` on CPU, measured (2 shared cores, jit, fwd+bwd of `sum(h)`,
B=2 T=4096 D=256 float32, median of 9): reference 31 ms, chunked 43 ms (C=16..64),
associative 39-65 ms. On a CPU the elementwise work is memory-bound and the parallel forms
only add passes. On GPU `auto` is `pallas`: on the H200 (2026-12-03, [8, 4096, 2048] float32,
jit, median of 20, ms fwd / fwd+bwd) it took 0.447 / 1.769 and 0.479 / 0.982 in two runs
against associative's 0.873 / 2.001, faster in both. Before the kernel, on an H100 (2026-11-24,
`experiments/bench/scan_bench.py`, B=8 D=2048 float32, fwd+bwd ms / peak GiB): T=1k
associative 0.77 / 0.37, chunked 3.38 / 0.57, reference 44.6 / 0.44; T=4k 2.55 / 1.42,
5.04 / 2.26, 175.9 / 1.75; T=16k 7.89 / 6.50, 20.95 / 9.05, 608 / 7.00. Associative was
faster and smaller at every length than chunked and reference. TPU: `chunked`, provisionally (not measured).

Dtypes: the recurrence runs in float32 (complex64 if `a` or `x` is complex); `h` comes back
in the dtype of `x` (complex64 when only `a` is complex), the final state `h_T` in the
float32 / complex64 compute dtype.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.linear_scan import ops as kernel_ops
from seqmix.ops import _chunk
from seqmix.ops._impl import platform, resolve

IMPLS = {"reference": True, "associative": True, "chunked": True, "pallas": True}
AUTO = {"cpu": "reference", "gpu": "pallas", "default": "chunked",
        "why": {"gpu": "H200 [8,4096,2048] f32: pallas 0.45 / 1.77 ms fwd / fwd+bwd vs "
                       "associative 0.87 / 2.00"}}


def _compute_dtype(*arrays):
  if any(v is not None and jnp.iscomplexobj(v) for v in arrays):
    return jnp.complex64
  return jnp.float32


def _combine(left, right):
  """Compose two affine maps h -> a h + x (left first, then right)."""
  a_l, x_l = left
  a_r, x_r = right
  return a_l * a_r, a_r * x_l + x_r


def _reference(a, x, h0):
  def step(h, ax):
    a_t, x_t = ax
    h = a_t * h + x_t
    return h, h

  # lax.scan runs over the leading axis: put time first.
  h_last, hs = lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(x, 1, 0)))
  return jnp.moveaxis(hs, 0, 1), h_last  # [b, t, ...]


def _associative(a, x, h0):
  # Folding h0 into the first input makes the scan start from zero.
  x = x.at[:, 0].add(a[:, 0] * h0)
  _, h = lax.associative_scan(_combine, (a, x), axis=1)
  return h, h[:, -1]


def _chunked(a, x, h0, chunk_size):
  c = min(int(chunk_size), a.shape[1])  # a chunk longer than T only adds padding
  # Neutral padding (a = 1, x = 0) leaves the carried state unchanged past T.
  a, t = _chunk.pad_time(a, c, value=1)
  x, _ = _chunk.pad_time(x, c, value=0)
  # [b, t, ...] -> [c, b, n, ...]: step j of every chunk at once.
  a_c = jnp.moveaxis(_chunk.to_chunks(a, c), 2, 0)
  x_c = jnp.moveaxis(_chunk.to_chunks(x, c), 2, 0)

  def within_chunk(carry, ax):
    a_cum, h = carry
    a_t, x_t = ax
    a_cum, h = a_cum * a_t, a_t * h + x_t
    return (a_cum, h), (a_cum, h)

  zero_start = (jnp.ones_like(a_c[0]), jnp.zeros_like(x_c[0]))  # [b, n, ...]
  (a_tot, h_end), (a_cum, h_loc) = lax.scan(within_chunk, zero_start, (a_c, x_c))

  def across_chunks(h, summary):
    a_n, h_n = summary
    return a_n * h + h_n, h  # emit the state entering chunk n

  h_last, h_in = lax.scan(across_chunks, h0,
                          (jnp.moveaxis(a_tot, 1, 0), jnp.moveaxis(h_end, 1, 0)))
  h = h_loc + a_cum * jnp.moveaxis(h_in, 0, 1)[None]  # [c, b, n, ...]
  h = _chunk.from_chunks(jnp.moveaxis(h, 0, 2))  # [b, t, ...]
  return h[:, :t], h_last


def _pallas(a, x, h0):
  b, t = a.shape[:2]
  if a[0, 0].size == 0:
    return x, h0
  # [b, t, ...] -> [b, t, d]: the kernel scans one flat channel axis.
  h, h_last = kernel_ops.linear_scan(a.reshape(b, t, -1), x.reshape(b, t, -1),
                                     h0.reshape(b, -1), interpret=platform() != "gpu")
  return h.reshape(a.shape), h_last.reshape(h0.shape)


@functools.partial(jax.jit, static_argnames=("chunk_size", "impl"))
def linear_scan(a, x, *, initial_state=None, chunk_size: int = 64, impl: str = "auto"):
  """h_t = a_t * h_{t-1} + x_t over time (axis 1).

  Args:
    a: [B, T, ...] multipliers, real or complex, any sign (0 = reset); broadcasts with `x`.
    x: [B, T, ...] inputs, real or complex.
    initial_state: [B, ...] h_0 (the state before t = 0), zeros if None.
    chunk_size: steps per chunk for impl="chunked" (any positive int; T need not divide).
    impl: "reference" | "associative" | "chunked" | "pallas" | "auto".

  Returns:
    (h [B, T, ...] in x's dtype, h_T [B, ...] float32 / complex64).
  """
  impl = resolve("linear_scan", impl, IMPLS, AUTO)
  if a.ndim < 2 or x.ndim < 2:
    raise ValueError(f"linear_scan: a and x need [B, T, ...] shapes; got {a.shape=}, {x.shape=}.")
  try:
    shape = jnp.broadcast_shapes(a.shape, x.shape)
  except ValueError as e:
    raise ValueError(f"linear_scan: a and x must broadcast; got {a.shape=}, {x.shape=}.") from e
  if chunk_size < 1:
    raise ValueError(f"linear_scan: chunk_size must be a positive int; got {chunk_size}.")
  cdt = _compute_dtype(a, x, initial_state)
  out_dtype = cdt if (cdt == jnp.complex64 and not jnp.iscomplexobj(x)) else x.dtype
  a = jnp.broadcast_to(a.astype(cdt), shape)
  x = jnp.broadcast_to(x.astype(cdt), shape)
  state_shape = (shape[0],) + shape[2:]
  if initial_state is None:
    h0 = jnp.zeros(state_shape, cdt)
  else:
    if initial_state.shape != state_shape:
      raise ValueError(f"linear_scan: initial_state must be [B, ...] = {state_shape}; "
                       f"got {initial_state.shape}.")
    h0 = initial_state.astype(cdt)
  if shape[1] == 0:
    return jnp.zeros(shape, out_dtype), h0
  if impl == "pallas":
    h, h_last = _pallas(a, x, h0)
  elif impl == "reference":
    h, h_last = _reference(a, x, h0)
  elif impl == "associative":
    h, h_last = _associative(a, x, h0)
  else:
    h, h_last = _chunked(a, x, h0, chunk_size)
  return h.astype(out_dtype), h_last
