"""Mamba's selective scan (S6): a diagonal SSM whose step size and B/C depend on the input.

    selective_scan(u, delta, A, B, C, D=None, *, delta_bias=None, delta_softplus=False,
                   initial_state=None, reset=None, chunk_size=64, impl="auto") -> (y, h_T)

    Δ_t = softplus(delta_t + delta_bias) if delta_softplus else delta_t + delta_bias   [B, D]
    h_t = exp(Δ_t ⊗ A) ⊙ (0 if reset_t else h_{t-1}) + (Δ_t ⊙ u_t) ⊗ B_t               [B, D, N]
    y_t = h_t C_t + D ⊙ u_t                                                             [B, D]

(`⊗` an outer product over the channel and state axes.) The output gate `z` of Mamba belongs
to the mixer, not to this op. `A` is real (Mamba's `-exp(A_log)`); a step with Δ_t = 0 leaves
the state untouched. `reset` ([B, T] bool, optional) zeroes the state before token t (packed
documents: True at each document's first token); no gradient flows across a reset.

Impls (exact names):
  reference  token-by-token `lax.scan` in float32; the oracle. Its backward keeps every h_t,
             i.e. [B, T, D, N] floats.
  chunked    a `lax.scan` over chunks of C = `chunk_size` steps. Each chunk builds its
             discretised [B, C, D, N] tensors, runs a `lax.associative_scan` over them from the
             carried state and contracts with C_t; the chunk body is rematerialised
             (`jax.checkpoint`), so neither pass ever holds more than one chunk's [B, C, D, N]
             plus the [B, D, N] chunk-boundary states.
  pallas     a Pallas kernel (`kernels_pallas/selective_scan/`): one program per (batch row,
             block of channels) keeps its [block_d, N] state in registers for the whole
             sequence, with Δ's bias and softplus and the D skip fused; the forward stores the
             state only at chunk boundaries and the backward recomputes each chunk's states
             from them and runs the reverse scan. `chunk_size` does not apply. Compiled
             (Triton lowering) on GPU, interpret mode elsewhere (a check, not a fast path).

`auto` resolves to `pallas` on GPU, measured on the H200 (2026-12-03, B=8 T=4096 D=2048 N=16
float32, softplus Δ, jit, median of 20; fwd / fwd+bwd of sum(y)): pallas 1.99 / 10.86 ms,
chunked 9.84 / 72.0 ms; the kernel matched the reference there (outputs, final state and every
gradient, with resets, within 1e-6). Elsewhere `auto` is `chunked`: its backward keeps T/C·D·N
floats instead of T·D·N, and it is the faster form on CPU (2 shared, loaded cores; jit fwd+bwd,
B=2 T=2048 D=128 N=16 float32, median of 5: reference 644 ms, chunked C=16 268 ms, C=64
203 ms, C=128 269 ms), where pallas only runs interpreted.

Dtypes: computed in float32; `y` in the dtype of `u`, the final state float32 [B, D, N].
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.selective_scan import ops as kernel_ops
from seqmix.ops import _chunk
from seqmix.ops._impl import platform, resolve
from seqmix.ops.scan import _associative

IMPLS = {"reference": True, "chunked": True, "pallas": True}
AUTO = {"gpu": "pallas", "default": "chunked",
        "why": {"gpu": "H200 B8 T4096 D2048 N16 f32: pallas 1.99 / 10.86 ms fwd / fwd+bwd vs "
                       "chunked 9.84 / 72.0"}}


def _discretise(delta_t, A, B_t, u_t):
  """[b, ..., d] step sizes -> (exp(Δ A), Δ u B), both [b, ..., d, n]."""
  d_a = jnp.exp(delta_t[..., None] * A)
  d_bu = (delta_t * u_t)[..., None] * B_t[..., None, :]
  return d_a, d_bu


def _reference(u, delta, A, B, C, h0, keep):
  def step(h, inp):
    u_t, delta_t, b_t, c_t, keep_t = inp  # [b, d], [b, d], [b, n], [b, n], [b]
    d_a, d_bu = _discretise(delta_t, A, b_t, u_t)
    h = d_a * (keep_t[:, None, None] * h) + d_bu  # [b, d, n]
    return h, jnp.einsum("bdn,bn->bd", h, c_t)

  xs = tuple(jnp.moveaxis(v, 1, 0) for v in (u, delta, B, C, keep))  # [t, b, ...]
  h_last, y = lax.scan(step, h0, xs)
  return jnp.moveaxis(y, 0, 1), h_last  # [b, t, d]


def _chunked(u, delta, A, B, C, h0, keep, chunk_size):
  c = min(int(chunk_size), u.shape[1])
  # Padding Δ = 0 (after the bias and softplus) makes exp(ΔA) = 1 and ΔuB = 0: an identity step
  # (keep = 1: no reset in the padding).
  padded = [_chunk.pad_time(v, c)[0] for v in (u, delta, B, C)]
  padded.append(_chunk.pad_time(keep, c, value=1)[0])
  t = u.shape[1]
  # [b, t, ...] -> [n_chunks, b, c, ...]
  xs = tuple(jnp.moveaxis(_chunk.to_chunks(v, c), 1, 0) for v in padded)

  @jax.checkpoint
  def chunk(h, inp):
    u_c, delta_c, b_c, c_c, keep_c = inp  # [b, c, d], [b, c, d], [b, c, n], [b, c, n], [b, c]
    d_a, d_bu = _discretise(delta_c, A, b_c, u_c)  # [b, c, d, n]
    d_a = d_a * keep_c[..., None, None]  # a reset step multiplies the carried state by 0
    hs, h = _associative(d_a, d_bu, h)
    return h, jnp.einsum("bcdn,bcn->bcd", hs, c_c)

  h_last, y = lax.scan(chunk, h0, xs)  # y [n_chunks, b, c, d]
  y = _chunk.from_chunks(jnp.moveaxis(y, 0, 1))  # [b, t, d]
  return y[:, :t], h_last


@functools.partial(jax.jit, static_argnames=("delta_softplus", "chunk_size", "impl"))
def selective_scan(u, delta, A, B, C, D=None, *, delta_bias=None, delta_softplus: bool = False,
                   initial_state=None, reset=None, chunk_size: int = 64, impl: str = "auto"):
  """The selective SSM recurrence (module docstring) over time.

  Args:
    u: [B, T, D] inputs.
    delta: [B, T, D] step sizes before the bias / softplus.
    A: [D, N] real state matrix (diagonal per channel; negative for a decaying state).
    B: [B, T, N] input projections.
    C: [B, T, N] output projections.
    D: [D] skip weight, or None.
    delta_bias: [D] added to delta, or None.
    delta_softplus: apply softplus to delta + delta_bias.
    initial_state: [B, D, N] state before t = 0, zeros if None.
    reset: [B, T] bool, True where the state is zeroed before token t (a document's first
      token), or None (no resets).
    chunk_size: steps per chunk for impl="chunked" (any positive int).
    impl: "reference" | "chunked" | "pallas" | "auto".

  Returns:
    (y [B, T, D] in u's dtype, h_T [B, D, N] float32).
  """
  impl = resolve("selective_scan", impl, IMPLS, AUTO)
  if u.ndim != 3 or delta.shape != u.shape:
    raise ValueError(f"selective_scan: u and delta must both be [B, T, D]; got {u.shape=}, "
                     f"{delta.shape=}.")
  b, t, d = u.shape
  if A.ndim != 2 or A.shape[0] != d:
    raise ValueError(f"selective_scan: A must be [D, N] with D={d}; got {A.shape=}.")
  n = A.shape[1]
  if B.shape != (b, t, n) or C.shape != (b, t, n):
    raise ValueError(f"selective_scan: B and C must be [B, T, N] = {(b, t, n)}; got "
                     f"{B.shape=}, {C.shape=}.")
  for name, v in (("D", D), ("delta_bias", delta_bias)):
    if v is not None and v.shape != (d,):
      raise ValueError(f"selective_scan: {name} must be [D] = ({d},); got {v.shape}.")
  if jnp.iscomplexobj(A):
    raise ValueError("selective_scan: A must be real (Mamba's -exp(A_log)); for complex "
                     "diagonal SSMs discretise in the mixer and use ops.scan.linear_scan.")
  if chunk_size < 1:
    raise ValueError(f"selective_scan: chunk_size must be a positive int; got {chunk_size}.")
  if reset is not None and reset.shape != (b, t):
    raise ValueError(f"selective_scan: reset must be [B, T] = {(b, t)} bool; got "
                     f"{reset.shape=}.")
  f32 = jnp.float32
  if initial_state is not None and initial_state.shape != (b, d, n):
    raise ValueError(f"selective_scan: initial_state must be [B, D, N] = {(b, d, n)}; got "
                     f"{initial_state.shape}.")
  if impl == "pallas":
    if t == 0:
      h0 = jnp.zeros((b, d, n), f32) if initial_state is None else initial_state.astype(f32)
      return jnp.zeros(u.shape, u.dtype), h0
    y, h_last = kernel_ops.selective_scan(
        u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus,
        initial_state=initial_state, reset=reset, interpret=platform() != "gpu")
    return y.astype(u.dtype), h_last
  keep = jnp.ones((b, t), f32) if reset is None else 1.0 - reset.astype(f32)
  u32, delta32 = u.astype(f32), delta.astype(f32)
  if delta_bias is not None:
    delta32 = delta32 + delta_bias.astype(f32)
  if delta_softplus:
    delta32 = jax.nn.softplus(delta32)
  if initial_state is None:
    h0 = jnp.zeros((b, d, n), f32)
  else:
    h0 = initial_state.astype(f32)
  if t == 0:
    return jnp.zeros(u.shape, u.dtype), h0
  args = (u32, delta32, A.astype(f32), B.astype(f32), C.astype(f32), h0, keep)
  if impl == "reference":
    y, h_last = _reference(*args)
  else:
    y, h_last = _chunked(*args, chunk_size)
  if D is not None:
    y = y + D.astype(f32) * u32
  return y.astype(u.dtype), h_last
