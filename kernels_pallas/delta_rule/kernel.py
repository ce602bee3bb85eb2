"""Chunkwise (gated) delta rule kernels: static parameters, then the kernel bodies.

One program per (batch, value head, V block) walks the chunks of C tokens in order, keeping the
`[K, Vb]` float32 state S on chip. Inside a chunk (positions 0..C-1, entering state S), with
seg[t, s] = g_{s+1} + .. + g_t (an exact sum of its own gates), D[t, s] = exp(seg[t, s]) for
s <= t (else 0), G_t = g_0 + .. + g_t and Γ = G_{C-1} (seqmix.ops.delta_rule's docstring is the
contract; no gate: D is the causal 0/1 mask, G = Γ = 0):

    A      = strictly lower part of diag(beta) (k kᵀ ⊙ D)                      [C, C]
    T      = (I + A)⁻¹, by forward substitution over the C rows (in the kernel)
    U      = T diag(beta) v,    Wk = T diag(beta ⊙ exp(G)) k
    w      = U - Wk S                                                  (the effective writes)
    o      = scale · ((q ⊙ exp(G)) S + (q kᵀ ⊙ D) w)
    S     <- exp(Γ) S + (k ⊙ exp(Γ - G))ᵀ w

T is built transposed (Tᵀ, so each substitution step reduces along one axis and writes one
column: `_unit_lower_inverse`), and used through dots that contract its first dim. Every
exponent is a sum of gates <= 0 taken directly from the gates (seg as one float32 product
(L ⊙ g) U of 0/1 triangles, exact to a few ulps of itself: no difference of two large cumsums,
which would lose eps·|G| under strong gates); the caller clamps -inf gates
(`_chunk.clamp_log_gate`).

The same bodies run compiled through the Pallas Triton lowering on GPU and in interpret mode on
CPU. Dot operands are in the inputs' dtype (bf16 on the tensor cores) with float32
accumulation; float32 inputs use IEEE products (not TF32). The triangular solve itself is float32
elementwise work.

Backward: see `backward` (kernel) below and ops.py (`backward="jax"`: the VJP of the pure-JAX
chunked form).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Static parameters of the delta rule kernels.

  chunk: tokens per chunk C (a power of two >= 16: Triton dots need dims >= 16).
  block_v: value columns per program (a power of two >= 16; the op pads V up to it).
  num_warps, num_stages: Triton launch parameters (ignored in interpret mode).
  """
  chunk: int = 64
  block_v: int = 64
  num_warps: int = 4
  num_stages: int = 2


def _dot(a, b, ca, cb, prec):
  """a·b contracting a's dim ca with b's dim cb (2-D), float32 accumulation."""
  return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=prec,
                         preferred_element_type=_F32)


def _precision(dtype):
  # float32 inputs: IEEE products on the GPU (the default would be TF32, ~1e-3 relative).
  return _HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _unit_lower_inverse(a, c):
  """Tᵀ where T = (I + A)⁻¹ for a strictly lower triangular float32 A [C, C].

  Row i of T is e_i - sum_{j<i} A[i, j] T[j, :] (rows j < i already final; rows j >= i still
  e_j, which A[i, j] = 0 leaves out). Kept transposed, step i reads row i of A (a reduction over
  axis 0) and writes column i of Tᵀ (a reduction over axis 1): no dynamic slicing, masks only.
  """
  idx = jnp.arange(c)
  row, col = idx[:, None], idx[None, :]

  def body(i, tt):
    a_i = jnp.sum(jnp.where(row == i, a, 0.0), axis=0)               # [c]: A[i, j] over j
    vec = jnp.sum(tt * a_i[None, :], axis=1)                         # [c]: (A T)[i, m] over m
    return jnp.where(col == i, tt - vec[:, None], tt)

  return lax.fori_loop(1, c, body, (row == col).astype(_F32))


def _gates(g_ref, n, c):
  """Per chunk: D [c, c], G [c] (inclusive), Γ, and Γ - G [c], all from exact gate sums."""
  idx = jnp.arange(c)
  row, col = idx[:, None], idx[None, :]
  causal = row >= col
  if g_ref is None:
    return causal.astype(_F32), None, None, None
  gr = g_ref[pl.ds(n * c, c)]                                          # [c] float32, <= 0
  lg = jnp.where(causal, gr[None, :], 0.0)                            # [t, r]: g_r, r <= t
  up = (row > col).astype(_F32)                                        # [r, s]: r > s
  seg = _dot(lg, up, 1, 0, _HIGHEST)                                   # [t, s]
  d = jnp.where(causal, jnp.exp(jnp.where(causal, seg, 0.0)), 0.0)
  gcum = jnp.sum(lg, axis=1)                                           # G_t
  to_end = jnp.sum(jnp.where(col > row, gr[None, :], 0.0), axis=1)     # Γ - G_t = sum_{r>t}
  gam = jnp.sum(gr)
  return d, gcum, gam, to_end


def _chunk_solve(k, beta, d, gcum, c, cdt, prec):
  """Tᵀ and the pieces every kernel needs: (tt [c, c] f32, bk [c] = beta ⊙ exp(G))."""
  kk = _dot(k, k, 1, 1, prec)                                          # [c, c]
  idx = jnp.arange(c)
  a = jnp.where(idx[:, None] > idx[None, :], beta[:, None] * kk * d, 0.0)
  tt = _unit_lower_inverse(a, c)
  bk = beta if gcum is None else beta * jnp.exp(gcum)
  del cdt
  return tt, bk


def _fwd_kernel(*refs, scale, c, n_chunks, has_gate, save_states):
  refs = list(refs)
  q_ref, k_ref, v_ref, b_ref = refs[:4]
  g_ref = refs[4] if has_gate else None
  rest = refs[5:] if has_gate else refs[4:]
  h0_ref, o_ref, s_ref = rest[:3]
  st_ref = rest[3] if save_states else None
  cdt = v_ref.dtype
  prec = _precision(cdt)
  kd = k_ref.shape[-1]

  def body(n, s):
    rows = pl.ds(n * c, c)
    if save_states:
      st_ref[pl.ds(n * kd, kd), :] = s
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]         # [c, K], [c, K], [c, Vb]
    beta = b_ref[rows]                                                 # [c] float32
    d, gcum, gam, to_end = _gates(g_ref, n, c)
    tt, bk = _chunk_solve(k, beta, d, gcum, c, cdt, prec)
    tt_c = tt.astype(cdt)
    bv = (beta[:, None] * v.astype(_F32)).astype(cdt)
    bkk = (bk[:, None] * k.astype(_F32)).astype(cdt)
    u = _dot(tt_c, bv, 0, 0, prec)                                     # T diag(beta) v [c, Vb]
    wk = _dot(tt_c, bkk, 0, 0, prec)                                   # [c, K]
    s_c = s.astype(cdt)
    w = u - _dot(wk.astype(cdt), s_c, 1, 0, prec)                      # [c, Vb]
    w_c = w.astype(cdt)
    att = (_dot(q, k, 1, 1, prec) * d).astype(cdt)                     # [c, c]
    if gcum is None:
      q_in, k_out, s_kept = q, k, s
    else:
      q_in = (q.astype(_F32) * jnp.exp(gcum)[:, None]).astype(cdt)
      k_out = (k.astype(_F32) * jnp.exp(to_end)[:, None]).astype(cdt)
      s_kept = jnp.exp(gam) * s
    o = _dot(q_in, s_c, 1, 0, prec) + _dot(att, w_c, 1, 0, prec)
    o_ref[rows, :] = (scale * o).astype(o_ref.dtype)
    return s_kept + _dot(k_out, w_c, 0, 0, prec)                       # [K, Vb]

  s_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))


def _specs(t, h, hk, kd, blocks):
  """BlockSpecs over the grid (b, h, j): time-major q/k/v rows, per-token scalars [B, H, T]."""
  r = h // hk
  bv = blocks.block_v
  qk = pl.BlockSpec((None, t, None, kd), lambda i, j, l: (i, 0, j // r, 0))
  vv = pl.BlockSpec((None, t, None, bv), lambda i, j, l: (i, 0, j, l))
  tok = pl.BlockSpec((None, None, t), lambda i, j, l: (i, j, 0))
  state = pl.BlockSpec((None, None, kd, bv), lambda i, j, l: (i, j, 0, l))
  states = pl.BlockSpec((None, None, (t // blocks.chunk) * kd, bv), lambda i, j, l: (i, j, 0, l))
  return qk, vv, tok, state, states


def _call(kernel, grid, in_specs, out_specs, out_shape, blocks, interpret, name):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                              num_stages=blocks.num_stages),
      interpret=interpret, name=name)


def forward(q, k, v, beta, g, h0, *, scale, blocks, interpret, save_states=False):
  """q, k `[B, T, G, K]`, v `[B, T, H, V]` (T % chunk == 0, V % block_v == 0, K a power of two
  >= 16), beta and g (None or clamped log gates) float32 `[B, H, T]`, h0 `[B, H, K, V]` float32.

  Returns (o `[B, T, H, V]` in v's dtype, final state `[B, H, K, V]` float32) and, with
  save_states, the float32 state entering every chunk `[B, H, N·K, V]` (N = T / chunk)."""
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  c = blocks.chunk
  qk, vv, tok, state, states = _specs(t, h, hk, kd, blocks)
  has_gate = g is not None
  kern = functools.partial(_fwd_kernel, scale=scale, c=c, n_chunks=t // c, has_gate=has_gate,
                           save_states=save_states)
  ins = [q, k, v, beta] + ([g] if has_gate else []) + [h0]
  specs = [qk, qk, vv, tok] + ([tok] if has_gate else []) + [state]
  outs = [vv, state] + ([states] if save_states else [])
  shapes = [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((b, h, kd, vd), _F32)]
  if save_states:
    shapes.append(jax.ShapeDtypeStruct((b, h, (t // c) * kd, vd), _F32))
  return _call(kern, (b, h, vd // blocks.block_v), specs, outs, shapes, blocks, interpret,
               "delta_rule_fwd")(*ins)
