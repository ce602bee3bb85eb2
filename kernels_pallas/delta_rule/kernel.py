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

Backward: `_bwd_kernel` (its docstring has the maths) walks the chunks in reverse with dS on
chip, reading the state entering each chunk from the forward (`save_states`) and recomputing
the chunk's T and w; or, in ops.py, `backward="jax"`: the VJP of the pure-JAX chunked form.
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


def _chunk_solve(k, beta, d, gcum, c, prec):
  """Tᵀ and the pieces every kernel needs: (tt [c, c] f32, bk [c] = beta ⊙ exp(G))."""
  kk = _dot(k, k, 1, 1, prec)                                          # [c, c]
  idx = jnp.arange(c)
  a = jnp.where(idx[:, None] > idx[None, :], beta[:, None] * kk * d, 0.0)
  tt = _unit_lower_inverse(a, c)
  bk = beta if gcum is None else beta * jnp.exp(gcum)
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
    tt, bk = _chunk_solve(k, beta, d, gcum, c, prec)
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


def _bwd_kernel(*refs, scale, c, n_chunks, has_gate):
  """dq, dk, dbeta, dg (this V block's parts), dv and dh0, walking the chunks in reverse.

  Given dO and dS' (the cotangent of the state leaving the chunk), with S the state entering
  it (saved by the forward), R = diag(β)(v − diag(e^G) k S) so that w = T R, P = q kᵀ ⊙ D,
  λ = e^{Γ−G}:

      dw  = scale Pᵀ dO + (λ ⊙ k) dS'          dR = Tᵀ dw          M = −dR wᵀ (strictly lower)
      dq  = scale e^G ⊙ dO Sᵀ + dP k,           dP = scale (dO wᵀ) ⊙ D
      dk  = dPᵀ q + λ ⊙ w dS'ᵀ − β e^G ⊙ dR Sᵀ + (N + Nᵀ) k,   N = diag(β) M ⊙ D
      dv  = β ⊙ dR,  dβ_t = (v_t − e^{G_t} k_t S)·dR_t + Σ_i M[t, i] (k kᵀ ⊙ D)[t, i]
      dS <- e^Γ dS' + scale (e^G ⊙ q)ᵀ dO − (β e^G ⊙ k)ᵀ dR
  (dA = −Tᵀ dT Tᵀ with dT = dw Rᵀ, and T R = w, gives M.) Gate, for r in the chunk:
      dg_r = Σ_{t >= r > s} dseg[t, s] + Σ_{t >= r} dG_t e^{G_t} + Σ_{t < r} dλ_t λ_t
             + e^Γ <dS', S>,      dseg = dD ⊙ D = dP ⊙ q kᵀ + N ⊙ k kᵀ,
  every term carrying its own decay (no cancellation of large undecayed terms).
  """
  refs = list(refs)
  q_ref, k_ref, v_ref, b_ref = refs[:4]
  g_ref = refs[4] if has_gate else None
  rest = refs[5:] if has_gate else refs[4:]
  st_ref, do_ref, ds_ref, dq_ref, dk_ref, dv_ref, db_ref = rest[:7]
  dg_ref, dh0_ref = (rest[7], rest[8]) if has_gate else (None, rest[7])
  cdt = v_ref.dtype
  prec = _precision(cdt)
  kd = k_ref.shape[-1]
  idx = jnp.arange(c)
  row, col = idx[:, None], idx[None, :]
  strict = row > col

  def body(i, ds):
    n = n_chunks - 1 - i
    rows = pl.ds(n * c, c)
    q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    beta = b_ref[rows]                                                 # [c] float32
    s = st_ref[pl.ds(n * kd, kd), :]                                   # [K, Vb] float32
    d, gcum, gam, to_end = _gates(g_ref, n, c)
    kk = _dot(k, k, 1, 1, prec)                                        # [c, c]
    tt = _unit_lower_inverse(jnp.where(strict, beta[:, None] * kk * d, 0.0), c)
    tt_c, s_c, ds_c = tt.astype(cdt), s.astype(cdt), ds.astype(cdt)
    ks = _dot(k, s_c, 1, 0, prec)                                      # k S  [c, Vb]
    if gcum is None:
      start, q_in, k_out, lam, ds_kept = None, q, k, None, ds
      pred = v.astype(_F32) - ks                                       # R / β
    else:
      start = jnp.exp(gcum)                                            # e^G  [c]
      lam = jnp.exp(to_end)                                            # e^{Γ-G}  [c]
      q_in = (q.astype(_F32) * start[:, None]).astype(cdt)
      k_out = (k.astype(_F32) * lam[:, None]).astype(cdt)
      ds_kept = jnp.exp(gam) * ds
      pred = v.astype(_F32) - start[:, None] * ks
    w = _dot(tt_c, (beta[:, None] * pred).astype(cdt), 0, 0, prec)     # T R  [c, Vb]
    w_c = w.astype(cdt)
    qk = _dot(q, k, 1, 1, prec)
    p = (qk * d).astype(cdt)                                           # [t, s]
    dw = scale * _dot(p, do, 0, 0, prec) + _dot(k_out, ds_c, 1, 0, prec)   # [c, Vb]
    dr = _dot(tt_c, dw.astype(cdt), 1, 0, prec)                        # Tᵀ dw  [c, Vb]
    dr_c = dr.astype(cdt)
    m = jnp.where(strict, -_dot(dr_c, w_c, 1, 1, prec), 0.0)          # dA  [c, c]
    nm = beta[:, None] * m * d                                         # d(k kᵀ), strictly lower
    dp = scale * _dot(do, w_c, 1, 1, prec) * d                         # [t, s]
    dp_c, nm_c = dp.astype(cdt), nm.astype(cdt)
    do_s = _dot(do, s_c, 1, 1, prec)                                   # dO Sᵀ  [c, K]
    dr_s = _dot(dr_c, s_c, 1, 1, prec)                                 # dR Sᵀ  [c, K]
    dk_state = _dot(w_c, ds_c, 1, 1, prec)                             # w dS'ᵀ  [c, K]
    bg = beta if start is None else beta * start                       # β e^G
    if lam is not None:
      dk_state = dk_state * lam[:, None]
    q_dec = scale * do_s if start is None else scale * do_s * start[:, None]
    dq = _dot(dp_c, k, 1, 0, prec) + q_dec
    dk = (_dot(dp_c, q, 0, 0, prec) + dk_state - bg[:, None] * dr_s
          + _dot(nm_c, k, 1, 0, prec) + _dot(nm_c, k, 0, 0, prec))
    dbeta = jnp.sum(pred * dr, axis=1) + jnp.sum(m * kk * d, axis=1)
    if has_gate:
      dseg = dp * qk + nm * kk                                         # [t, s]
      up = (row < col).astype(_F32)                                    # [s, r]: s < r
      x = _dot(dseg, up, 1, 0, _HIGHEST)                               # [t, r]: sum_{s<r}
      rect = jnp.sum(jnp.where(row >= col, x, 0.0), axis=0)            # [r]: sum_{t>=r}
      dlog_g = (jnp.sum(q.astype(_F32) * q_dec, axis=1)               # dG_t e^{G_t}
                - start * beta * jnp.sum(ks * dr, axis=1))
      dlog_l = jnp.sum(k.astype(_F32) * dk_state, axis=1)              # dλ_t λ_t
      e = jnp.exp(gam) * jnp.sum(jnp.sum(ds * s, axis=1), axis=0)
      after = row <= col                                               # [r, t]: t >= r
      dg_ref[rows] = (rect + jnp.sum(jnp.where(after, dlog_g[None, :], 0.0), axis=1)
                      + jnp.sum(jnp.where(after, 0.0, dlog_l[None, :]), axis=1) + e)
    dq_ref[rows, :] = dq
    dk_ref[rows, :] = dk
    dv_ref[rows, :] = (beta[:, None] * dr).astype(dv_ref.dtype)
    db_ref[rows] = dbeta
    bgk = (bg[:, None] * k.astype(_F32)).astype(cdt)
    return (ds_kept + scale * _dot(q_in, do, 0, 0, prec)
            - _dot(bgk, dr_c, 0, 0, prec))                             # [K, Vb]

  dh0_ref[...] = lax.fori_loop(0, n_chunks, body, ds_ref[...].astype(_F32))


def backward(q, k, v, beta, g, states, do, ds, *, scale, blocks, interpret):
  """Cotangents of `forward`'s inputs given do `[B, T, H, V]` (v's dtype), ds `[B, H, K, V]`
  float32 and the states `forward(..., save_states=True)` wrote.

  Returns dq, dk per value head `[B, T, H, K]` float32 (summed over V blocks, not over the
  heads that share a q/k head), dv `[B, T, H, V]` in v's dtype, dbeta `[B, H, T]` float32,
  dg `[B, H, T]` float32 (None without gates) and dh0 `[B, H, K, V]` float32.
  """
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  c = blocks.chunk
  nv = vd // blocks.block_v
  qk, vv, tok, state, states_spec = _specs(t, h, hk, kd, blocks)
  part = pl.BlockSpec((None, None, t, None, kd), lambda i, j, l: (l, i, 0, j, 0))
  tpart = pl.BlockSpec((None, None, None, t), lambda i, j, l: (l, i, j, 0))
  has_gate = g is not None
  kern = functools.partial(_bwd_kernel, scale=scale, c=c, n_chunks=t // c, has_gate=has_gate)
  ins = [q, k, v, beta] + ([g] if has_gate else []) + [states, do, ds]
  specs = [qk, qk, vv, tok] + ([tok] if has_gate else []) + [states_spec, vv, state]
  part_shape = jax.ShapeDtypeStruct((nv, b, t, h, kd), _F32)
  tok_shape = jax.ShapeDtypeStruct((nv, b, h, t), _F32)
  outs = [part, part, vv, tpart] + ([tpart] if has_gate else []) + [state]
  shapes = ([part_shape, part_shape, jax.ShapeDtypeStruct(v.shape, v.dtype), tok_shape]
            + ([tok_shape] if has_gate else []) + [jax.ShapeDtypeStruct((b, h, kd, vd), _F32)])
  res = _call(kern, (b, h, nv), specs, outs, shapes, blocks, interpret,
              "delta_rule_bwd")(*ins)
  dq, dk, dv, dbeta = res[:4]
  dg = res[4].sum(0) if has_gate else None
  return dq.sum(0), dk.sum(0), dv, dbeta.sum(0), dg, res[-1]
