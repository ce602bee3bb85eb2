"""Chunkwise gla kernels (scalar, fixed or no gate): block sizes, then the three kernel bodies.

One program per (batch, value head, V block) walks the chunks of C tokens in order (forward,
dq) or in reverse (dk, dv), keeping the `[K, Vb]` float32 state (or its cotangent) on chip.
Inside a chunk, with G the chunk-local inclusive cumsum of the log gates (G_t = g_1 + .. + g_t)
and Γ = G_{C-1} the chunk's total:

    D[t, s]  = exp(G_t - G_s) for s <= t, else 0                      (both <= 1)
    o        = scale · ((q kᵀ ⊙ D) v + (q ⊙ exp(G)) S)
    S       <- exp(Γ) S + (k ⊙ exp(Γ - G))ᵀ v

Every exponent is a sum of gates <= 0 measured inside one chunk, so nothing overflows; the
caller clamps -inf gates (`_chunk.clamp_log_gate`) so no inf - inf appears.

Backward (given dO and the cotangent dS of the state leaving the chunk), in two kernels: the
states kernel replays the forward in order and writes the state entering each chunk (float32
`[B, H, N·K, V]`, the only stored intermediate); the backward kernel walks the chunks in
reverse carrying dS:

    dq = scale · ((dO vᵀ ⊙ D) k + exp(G) ⊙ dO S_inᵀ)
    dk = scale · (dO vᵀ ⊙ D)ᵀ q + exp(Γ - G) ⊙ v dSᵀ
    dv = scale · (q kᵀ ⊙ D)ᵀ dO + (k ⊙ exp(Γ - G)) dS
    dS <- exp(Γ) dS + scale · (q ⊙ exp(G))ᵀ dO

Gate cotangent, per chunk (g_r with r in the chunk reaches the chunk's outputs and, through
the state leaving it, everything after):

    dg_r = sum_{t >= r} (q_t·dq_inter_t + rowsum_t(M) - colsum_t(M))
           + sum_{s < r} k_s·dk_state_s + exp(Γ) <dS, S_in>,
    M = (dO vᵀ ⊙ D) ⊙ q kᵀ strictly below the diagonal, dq_inter = scale · exp(G) ⊙ dO S_inᵀ,
    dk_state = exp(Γ - G) ⊙ v dSᵀ.

Every term carries its own decay. The shorter global form (dG_t = q_t·dq_t - k_t·dk_t plus
<dS_T, S_T>, reverse-cumsummed over the sequence) cancels O(1) terms down to values decayed by
strong gates and lost float32 accuracy (measured 2e-5 relative on dg under -20 per step); so does
the undecayed diagonal (dO_t·v_t)(q_t·k_t), which M leaves out. For the same reason the backward
needs D to full relative precision: exp(G_t - G_s) from cumsums loses eps·|G_t| (|G| reaches
~1e3 under strong gates), so the backward takes the raw gates and forms the pairwise sums
seg[t, s] = g_{s+1} + .. + g_t as one float32 product (L ⊙ g) U with the 0/1 triangles L, U
(each entry a sum of exactly its own gates, as `_chunk.segsum`): one C×C×C float32 product
per chunk, in the backward only.

The same bodies run compiled through the Pallas Triton lowering on GPU and in interpret mode on
CPU. Dot operands are in the inputs' dtype (bf16 on the tensor cores) with float32
accumulation; float32 inputs use full-precision (IEEE) products, not TF32.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Static parameters of the gla kernels.

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
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _chunk_gates(g_ref, n, c):
  """Chunk-local cumulative gates G [C], the total Γ, and the causal decay matrix D [C, C]."""
  idx = jnp.arange(c)
  causal = idx[:, None] >= idx[None, :]
  if g_ref is None:
    return None, None, causal.astype(_F32)
  gc = g_ref[pl.ds(n * c, c)]                                          # [c] float32
  gam = jnp.sum(jnp.where(idx == c - 1, gc, 0.0))
  diff = jnp.where(causal, gc[:, None] - gc[None, :], 0.0)
  return gc, gam, jnp.where(causal, jnp.exp(diff), 0.0)


def _exact_decay(graw_ref, n, c):
  """exp(g_{s+1} + .. + g_t) for s <= t (0 above the diagonal), summed term by term. [c, c]"""
  idx = jnp.arange(c)
  gr = graw_ref[pl.ds(n * c, c)]                                       # [c] float32
  lg = jnp.where(idx[:, None] >= idx[None, :], gr[None, :], 0.0)       # [t, r]: g_r, r <= t
  up = (idx[:, None] > idx[None, :]).astype(_F32)                      # [r, s]: r > s
  seg = _dot(lg, up, 1, 0, lax.Precision.HIGHEST)                      # [t, s]
  causal = idx[:, None] >= idx[None, :]
  return jnp.where(causal, jnp.exp(jnp.where(causal, seg, 0.0)), 0.0)


def _fwd_kernel(*refs, scale, c, n_chunks, has_gate):
  if has_gate:
    q_ref, k_ref, v_ref, g_ref, h0_ref, o_ref, s_ref = refs
  else:
    q_ref, k_ref, v_ref, h0_ref, o_ref, s_ref = refs
    g_ref = None
  cdt = v_ref.dtype
  prec = _precision(cdt)

  def body(n, s):
    rows = pl.ds(n * c, c)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]         # [c, K], [c, K], [c, Vb]
    gc, gam, d = _chunk_gates(g_ref, n, c)
    att = _dot(q, k, 1, 1, prec) * d                                   # [c, c]
    o = _dot(att.astype(cdt), v, 1, 0, prec)                           # [c, Vb]
    if gc is None:
      q_in, k_out, s_kept = q, k, s
    else:
      q_in = (q.astype(_F32) * jnp.exp(gc)[:, None]).astype(cdt)
      k_out = (k.astype(_F32) * jnp.exp(gam - gc)[:, None]).astype(cdt)
      s_kept = jnp.exp(gam) * s
    o = o + _dot(q_in, s.astype(cdt), 1, 0, prec)
    o_ref[rows, :] = (scale * o).astype(o_ref.dtype)
    return s_kept + _dot(k_out, v, 0, 0, prec)                         # [K, Vb]

  s_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))


def _states_kernel(*refs, c, n_chunks, has_gate):
  """The state entering every chunk (forward order), for the backward."""
  if has_gate:
    k_ref, v_ref, g_ref, h0_ref, st_ref = refs
  else:
    k_ref, v_ref, h0_ref, st_ref = refs
    g_ref = None
  cdt = v_ref.dtype
  prec = _precision(cdt)
  kd = k_ref.shape[-1]

  def body(n, s):
    rows = pl.ds(n * c, c)
    st_ref[pl.ds(n * kd, kd), :] = s
    k, v = k_ref[rows, :], v_ref[rows, :]
    if g_ref is None:
      return s + _dot(k, v, 0, 0, prec)
    gc, gam, _ = _chunk_gates(g_ref, n, c)
    k_out = (k.astype(_F32) * jnp.exp(gam - gc)[:, None]).astype(cdt)
    return jnp.exp(gam) * s + _dot(k_out, v, 0, 0, prec)

  lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))


def _bwd_kernel(*refs, scale, c, n_chunks, has_gate):
  """dq, dk (this V block's parts), dv, dh0 and dg (this V block's part), reverse order."""
  if has_gate:
    (q_ref, k_ref, v_ref, do_ref, g_ref, graw_ref, st_ref, ds_ref,
     dq_ref, dk_ref, dv_ref, dh0_ref, dg_ref) = refs
  else:
    q_ref, k_ref, v_ref, do_ref, st_ref, ds_ref, dq_ref, dk_ref, dv_ref, dh0_ref = refs
    g_ref = None
  cdt = v_ref.dtype
  prec = _precision(cdt)
  kd = k_ref.shape[-1]
  idx = jnp.arange(c)

  def body(i, ds):
    n = n_chunks - 1 - i
    rows = pl.ds(n * c, c)
    q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    s_in = st_ref[pl.ds(n * kd, kd), :]                                # [K, Vb] float32
    gc, gam, d = _chunk_gates(g_ref, n, c)
    if gc is not None:
      d = _exact_decay(graw_ref, n, c)
    qk = _dot(q, k, 1, 1, prec)                                        # [t, s]
    att = (scale * qk) * d
    dp = (scale * _dot(do, v, 1, 1, prec)) * d
    dq_inter = scale * _dot(do, s_in.astype(cdt), 1, 1, prec)          # [c, K]
    if gc is None:
      q_in, k_out, v_out, ds_kept = q, k, v, ds
    else:
      to_end = jnp.exp(gam - gc)[:, None]
      dq_inter = dq_inter * jnp.exp(gc)[:, None]
      q_in = (q.astype(_F32) * jnp.exp(gc)[:, None]).astype(cdt)
      k_out = (k.astype(_F32) * to_end).astype(cdt)
      v_out = (v.astype(_F32) * to_end).astype(cdt)
      ds_kept = jnp.exp(gam) * ds
    ds_c = ds.astype(cdt)
    dv = _dot(att.astype(cdt), do, 0, 0, prec) + _dot(k_out, ds_c, 1, 0, prec)   # [c, Vb]
    dk_state = _dot(v_out, ds_c, 1, 1, prec)                          # [c, K]
    dk = _dot(dp.astype(cdt), q, 0, 0, prec) + dk_state
    dq = _dot(dp.astype(cdt), k, 1, 0, prec) + dq_inter
    if gc is not None:
      m = jnp.where(idx[:, None] > idx[None, :], dp * qk, 0.0)         # [t, s]
      x = (jnp.sum(q.astype(_F32) * dq_inter, axis=1)
           + jnp.sum(m, axis=1) - jnp.sum(m, axis=0))                  # [c]
      y = jnp.sum(k.astype(_F32) * dk_state, axis=1)                   # [c]
      e = jnp.exp(gam) * jnp.sum(jnp.sum(ds * s_in, axis=1), axis=0)
      after = idx[:, None] <= idx[None, :]                             # [r, t]: t >= r
      dg = (jnp.sum(jnp.where(after, x[None, :], 0.0), axis=1)
            + jnp.sum(jnp.where(after, 0.0, y[None, :]), axis=1) + e)
      dg_ref[rows] = dg
    dq_ref[rows, :] = dq
    dk_ref[rows, :] = dk
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return ds_kept + scale * _dot(q_in, do, 0, 0, prec)                # [K, Vb]

  dh0_ref[...] = lax.fori_loop(0, n_chunks, body, ds_ref[...].astype(_F32))


def _specs(b, t, h, hk, kd, blocks):
  """BlockSpecs over the grid (b, h, j): time-major q/k/v rows, gates [B, H, T], states."""
  r = h // hk
  bv = blocks.block_v
  qk = pl.BlockSpec((None, t, None, kd), lambda i, j, l: (i, 0, j // r, 0))
  kvh = pl.BlockSpec((None, t, None, kd), lambda i, j, l: (i, 0, j, 0))
  vv = pl.BlockSpec((None, t, None, bv), lambda i, j, l: (i, 0, j, l))
  gate = pl.BlockSpec((None, None, t), lambda i, j, l: (i, j, 0))
  state = pl.BlockSpec((None, None, kd, bv), lambda i, j, l: (i, j, 0, l))
  part = pl.BlockSpec((None, None, t, None, kd), lambda i, j, l: (l, i, 0, j, 0))
  states = pl.BlockSpec((None, None, (t // blocks.chunk) * kd, bv), lambda i, j, l: (i, j, 0, l))
  gpart = pl.BlockSpec((None, None, None, t), lambda i, j, l: (l, i, j, 0))
  return qk, kvh, vv, gate, state, part, gpart, states


def _call(kernel, grid, in_specs, out_specs, out_shape, blocks, interpret, name):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=blocks.num_warps,
                                              num_stages=blocks.num_stages),
      interpret=interpret, name=name)


def forward(q, k, v, g, h0, *, scale, blocks, interpret):
  """q, k `[B, T, G, K]`, v `[B, T, H, V]` (T % chunk == 0, V % block_v == 0), g None or
  chunk-local cumsums `[B, H, T]` float32, h0 `[B, H, K, V]` float32.

  Returns (o `[B, T, H, V]` in v's dtype, final state `[B, H, K, V]` float32)."""
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  c = blocks.chunk
  qk, _, vv, gate, state, _, _, _ = _specs(b, t, h, hk, kd, blocks)
  has_gate = g is not None
  kern = functools.partial(_fwd_kernel, scale=scale, c=c, n_chunks=t // c, has_gate=has_gate)
  ins = [q, k, v] + ([g] if has_gate else []) + [h0]
  specs = [qk, qk, vv] + ([gate] if has_gate else []) + [state]
  return _call(kern, (b, h, vd // blocks.block_v), specs, [vv, state],
               [jax.ShapeDtypeStruct(v.shape, v.dtype),
                jax.ShapeDtypeStruct((b, h, kd, vd), _F32)],
               blocks, interpret, "gla_fwd")(*ins)


def backward(q, k, v, g, graw, h0, do, ds, *, scale, blocks, interpret):
  """Cotangents of `forward`'s inputs given do `[B, T, H, V]` and ds `[B, H, K, V]`.

  graw: the per-token gates `[B, H, T]` whose chunk-local cumsums are g (None without gates).

  Returns dq, dk per value head `[B, T, H, K]` float32 (summed over V blocks, not over the
  heads that share a q/k head), dv `[B, T, H, V]` in v's dtype, dh0 `[B, H, K, V]` float32,
  and dg `[B, H, T]` float32, the cotangent of the per-token gates graw (None without gates).
  """
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  c = blocks.chunk
  nv = vd // blocks.block_v
  qk, _, vv, gate, state, part, gpart, states = _specs(b, t, h, hk, kd, blocks)
  has_gate = g is not None
  grid = (b, h, nv)
  gs, gspec = ([g], [gate]) if has_gate else ([], [])
  st = _call(functools.partial(_states_kernel, c=c, n_chunks=t // c, has_gate=has_gate), grid,
             [qk, vv] + gspec + [state], states,
             jax.ShapeDtypeStruct((b, h, (t // c) * kd, vd), _F32), blocks, interpret,
             "gla_bwd_states")(k, v, *gs, h0)
  part_shape = jax.ShapeDtypeStruct((nv, b, t, h, kd), _F32)
  outs = [part, part, vv, state] + ([gpart] if has_gate else [])
  shapes = [part_shape, part_shape, jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((b, h, kd, vd), _F32)]
  shapes += [jax.ShapeDtypeStruct((nv, b, h, t), _F32)] if has_gate else []
  res = _call(functools.partial(_bwd_kernel, scale=scale, c=c, n_chunks=t // c,
                                has_gate=has_gate), grid,
              [qk, qk, vv, vv] + gspec * 2 + [states, state], outs, shapes, blocks, interpret,
              "gla_bwd")(q, k, v, do, *(gs + [graw] if has_gate else []), st, ds)
  dq, dk, dv, dh0 = res[:4]
  dg = res[4].sum(0) if has_gate else None
  return dq.sum(0), dk.sum(0), dv, dh0, dg
