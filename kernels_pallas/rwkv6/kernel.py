"""Chunkwise rwkv6 kernels: gla's per-key kernels (kernels_pallas/gla/kernel_key.py) with the
read before the write and the bonus u on the current token.

    o_t = scale · r_t (S_{t-1} + diag(u) k_tᵀ v_t),   S_t = diag(e^{w_t}) S_{t-1} + k_tᵀ v_t.

Inside a chunk (entering state S_in; w clamped, per key), with seg(t, s) = w_{s+1} + .. + w_t:

    o_t = scale · ((r_t ⊙ e^{seg(t-1, -1)}) S_in + sum_{s<t} (r_t ⊙ k_s ⊙ e^{seg(t-1, s)})·1 v_s
                   + (r_t ⊙ u ⊙ k_t)·1 v_t)
    S_out = e^Γ ⊙ S_in + (k ⊙ e^{seg(C-1, s)})ᵀ v

The key columns s = C-1 .. 0 are walked with the running sums R_s[t] = seg(t-1, s) =
R_{s+1}[t] + w_{s+1} (t > s + 1; 0 at t = s + 1): sums of gates <= 0, exact to a few ulps of
themselves. seg(C-1, s) = R_s[C-1] + w_{C-1}, and one more step gives seg(t-1, -1).

Backward (reverse chunks, carrying dS), dP = scale · dO vᵀ, D the per-key decays above:
    dr = sum_{s<t} dP[t,s] k_s ⊙ D + dP[t,t] u ⊙ k_t + scale · e^{seg(t-1,-1)} ⊙ dO S_inᵀ
    dk = sum_{t>s} dP[t,s] r_t ⊙ D + dP[s,s] u ⊙ r_s + e^{seg(C-1,s)} ⊙ v dSᵀ
    dv = Aᵀ dO + (k ⊙ e^{seg(C-1, s)}) dS,   du = sum_t dP[t,t] r_t ⊙ k_t
    dw_r = sum_{t>r} (r ⊙ (dr_inter + dr_strict))_t - sum_{s>=r} (k ⊙ dk_strict)_s
           + sum_{s<r} (k ⊙ dk_state)_s + e^Γ ⊙ rowsum(dS ⊙ S_in)
(w_r decays the pairs s < r < t, the reads of S_in at t > r and the state writes of s < r;
"strict" here means t > s + 1: the adjacent pairs (t = s + 1) carry no decay, and summed into
dr, dk they would cancel in dw, like gla's diagonal: measured 9e-6 relative on dw with them,
3e-7 without.)
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.gla import kernel_key
from kernels_pallas.gla.kernel import _F32, _call, _dot, _precision

_HI = lax.Precision.HIGHEST


def _walk(w_ref, k_ref, base, c, visit):
  """Walk key columns s = c-1 .. 0; visit(s, R_s, k_s) with R_s[t] = seg(t-1, s) for t > s.

  Returns (seg(t-1, -1) `[c, K]`, TE `[c, K]` with row s = e^{seg(c-1, s)}, Γ `[K]`).
  """
  tt = jnp.arange(c)[:, None]
  kd = k_ref.shape[-1]
  w_last = w_ref[pl.ds(base + c - 1, 1), :]                               # [1, K]
  r = jnp.zeros((c, kd), _F32)
  te = jnp.zeros((c, kd), _F32)
  for s in reversed(range(c)):
    if s < c - 1:
      r = jnp.where(tt > s + 1, r + w_ref[pl.ds(base + s + 1, 1), :], 0.0)   # seg(t-1, s)
      r_end = jnp.sum(jnp.where(tt == c - 1, r, 0.0), axis=0)[None, :] + w_last
    else:
      r_end = jnp.zeros((1, kd), _F32)
    ks = k_ref[pl.ds(base + s, 1), :].astype(_F32)                        # [1, K]
    visit(s, r, ks)
    te = te + jnp.where(tt == s, jnp.exp(r_end), 0.0)
  g_read = jnp.where(tt > 0, r + w_ref[pl.ds(base, 1), :], 0.0)           # seg(t-1, -1)
  gam = jnp.sum(jnp.where(tt == c - 1, g_read, 0.0), axis=0) + w_last[0]
  return g_read, te, gam


def _fwd_kernel(r_ref, k_ref, v_ref, w_ref, u_ref, h0_ref, o_ref, *refs, scale, c, n_chunks,
                write_final=True):
  if write_final:
    s_ref, *st_ref = refs
  else:
    s_ref, st_ref = None, list(refs)
  cdt = v_ref.dtype
  prec = _precision(cdt)
  kd = k_ref.shape[-1]
  tt = jnp.arange(c)[:, None]
  cc = jnp.arange(c)[None, :]
  u = u_ref[...].astype(_F32)[None, :]                                    # [1, K]

  def body(n, s_in):
    base = n * c
    rows = pl.ds(base, c)
    if st_ref:
      st_ref[0][pl.ds(n * kd, kd), :] = s_in.astype(st_ref[0].dtype)
    rf = r_ref[rows, :].astype(_F32)
    kf = k_ref[rows, :].astype(_F32)
    v = v_ref[rows, :]
    acc = {"a": jnp.where(tt == cc, jnp.sum(rf * u * kf, axis=1)[:, None], 0.0)}

    def visit(s, rr, ks):
      col = jnp.sum(rf * ks * jnp.where(tt > s, jnp.exp(rr), 0.0), axis=1)   # [c]
      acc["a"] = acc["a"] + jnp.where(cc == s, col[:, None], 0.0)

    g_read, te, gam = _walk(w_ref, k_ref, base, c, visit)
    o = _dot(acc["a"].astype(cdt), v, 1, 0, prec)
    o = o + _dot((rf * jnp.exp(g_read)).astype(cdt), s_in.astype(cdt), 1, 0, prec)
    o_ref[rows, :] = (scale * o).astype(o_ref.dtype)
    return jnp.exp(gam)[:, None] * s_in + _dot((kf * te).astype(cdt), v, 0, 0, prec)

  s = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))
  if s_ref is not None:
    s_ref[...] = s


def _bwd_kernel(r_ref, k_ref, v_ref, do_ref, w_ref, u_ref, st_ref, ds_ref,
                dr_ref, dk_ref, dv_ref, dh0_ref, dw_ref, du_ref, *, scale, c, n_chunks):
  cdt = v_ref.dtype
  prec = _precision(cdt)
  kd = k_ref.shape[-1]
  tt = jnp.arange(c)[:, None]
  cc = jnp.arange(c)[None, :]
  after_strict = (cc > tt).astype(_F32)                                   # [r, t]: t > r
  after = (cc >= tt).astype(_F32)                                         # [r, s]: s >= r
  before = (cc < tt).astype(_F32)                                         # [r, s]: s < r
  u = u_ref[...].astype(_F32)[None, :]

  def body(i, carry):
    ds, du = carry
    n = n_chunks - 1 - i
    base = n * c
    rows = pl.ds(base, c)
    rq, k, v, do = r_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    rf, kf = rq.astype(_F32), k.astype(_F32)
    s_in = st_ref[pl.ds(n * kd, kd), :].astype(_F32)
    dp = scale * _dot(do, v, 1, 1, prec)                                  # [t, s]
    dp_diag = jnp.sum(jnp.where(tt == cc, dp, 0.0), axis=1)[:, None]      # [c, 1]
    acc = {"a": jnp.zeros((c, c), _F32), "dr": jnp.zeros((c, kd), _F32),
           "dk": jnp.zeros((c, kd), _F32)}

    def visit(s, rr, ks):
      acc["a"] = acc["a"] + jnp.where(
          cc == s, jnp.sum(rf * ks * jnp.where(tt > s, jnp.exp(rr), 0.0), axis=1)[:, None], 0.0)
      # Pairs t > s + 1 only: the adjacent pairs carry no decay (added below, not into dw).
      dec = jnp.where(tt > s + 1, jnp.exp(rr), 0.0)                       # [c, K]
      dp_col = jnp.sum(jnp.where(cc == s, dp, 0.0), axis=1)[:, None]      # [c, 1]
      acc["dr"] = acc["dr"] + dp_col * ks * dec
      acc["dk"] = acc["dk"] + jnp.where(tt == s, jnp.sum(dp_col * rf * dec, axis=0)[None, :],
                                        0.0)

    g_read, te, gam = _walk(w_ref, k_ref, base, c, visit)
    eg = jnp.exp(g_read)
    att = scale * (acc["a"] + jnp.where(tt == cc, jnp.sum(rf * u * kf, axis=1)[:, None], 0.0))
    ds_c = ds.astype(cdt)
    dv = _dot(att.astype(cdt), do, 0, 0, prec) + _dot((kf * te).astype(cdt), ds_c, 1, 0, prec)
    dk_state = _dot(v, ds_c, 1, 1, prec) * te
    dr_inter = scale * _dot(do, s_in.astype(cdt), 1, 1, prec) * eg
    dp_adj = jnp.where(tt == cc + 1, dp, 0.0)                             # [t, t-1]
    dr_ref[rows, :] = (acc["dr"] + _dot(dp_adj, kf, 1, 0, _HI) + dp_diag * u * kf + dr_inter)
    dk_ref[rows, :] = (acc["dk"] + _dot(dp_adj, rf, 0, 0, _HI) + dp_diag * u * rf + dk_state)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    e = jnp.exp(gam) * jnp.sum(ds * s_in, axis=1)                         # [K]
    dw_ref[rows, :] = (_dot(after_strict, rf * (dr_inter + acc["dr"]), 1, 0, _HI)
                       - _dot(after, kf * acc["dk"], 1, 0, _HI)
                       + _dot(before, kf * dk_state, 1, 0, _HI) + e[None, :])
    du = du + jnp.sum(dp_diag * rf * kf, axis=0)
    ds = jnp.exp(gam)[:, None] * ds + scale * _dot((rf * eg).astype(cdt), do, 0, 0, prec)
    return ds, du

  dh0, du = lax.fori_loop(0, n_chunks, body,
                          (ds_ref[...].astype(_F32), jnp.zeros((kd,), _F32)))
  dh0_ref[...] = dh0
  du_ref[...] = du


def _specs(t, kd, blocks):
  bv = blocks.block_v
  rk = pl.BlockSpec((None, t, None, kd), lambda i, j, l: (i, 0, j, 0))
  vv = pl.BlockSpec((None, t, None, bv), lambda i, j, l: (i, 0, j, l))
  uu = pl.BlockSpec((None, kd), lambda i, j, l: (j, 0))
  state = pl.BlockSpec((None, None, kd, bv), lambda i, j, l: (i, j, 0, l))
  states = pl.BlockSpec((None, None, (t // blocks.chunk) * kd, bv), lambda i, j, l: (i, j, 0, l))
  part = pl.BlockSpec((None, None, t, None, kd), lambda i, j, l: (l, i, 0, j, 0))
  upart = pl.BlockSpec((None, None, None, kd), lambda i, j, l: (l, i, j, 0))
  return rk, vv, uu, state, states, part, upart


def forward(r, k, v, w, u, h0, *, scale, blocks, interpret, states_dtype=None):
  """r, k, w (clamped float32) `[B, T, H, K]`, v `[B, T, H, V]`, u `[H, K]` float32, h0
  `[B, H, K, V]` (T % chunk == 0, V % block_v == 0). Returns (o, final state[, states])."""
  b, t, h, kd = r.shape
  vd = v.shape[3]
  c = blocks.chunk
  if blocks.forward == "two_pass":
    # The state recurrence is gla's per-key one: pass 1 is shared; pass 2 walks each
    # super-chunk's chunks from its entering state with this body.
    h_in, s_fin = kernel_key.super_chunk_states(k, v, w, h0, blocks=blocks,
                                                interpret=interpret, name="rwkv6_fwd_states")
    _, rows, vs, h0s, sub = kernel_key.super_chunk_specs(t, h, h, kd, blocks)
    uu = pl.BlockSpec((None, kd), lambda i, j, n, l: (j, 0))
    outs, shapes = [vs], [jax.ShapeDtypeStruct(v.shape, v.dtype)]
    if states_dtype is not None:
      outs.append(sub)
      shapes.append(jax.ShapeDtypeStruct((b, h, (t // c) * kd, vd), states_dtype))
    cs = blocks.super_chunk
    kern = functools.partial(_fwd_kernel, scale=scale, c=c, n_chunks=cs // c, write_final=False)
    res = _call(kern, (b, h, t // cs, vd // blocks.block_v), [rows, rows, vs, rows, uu, h0s],
                outs, shapes, blocks, interpret, "rwkv6_fwd_chunks")(r, k, v, w, u, h_in)
    return (res[0], s_fin) + tuple(res[1:])
  rk, vv, uu, state, states, _, _ = _specs(t, kd, blocks)
  outs = [vv, state]
  shapes = [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((b, h, kd, vd), _F32)]
  if states_dtype is not None:
    outs.append(states)
    shapes.append(jax.ShapeDtypeStruct((b, h, (t // c) * kd, vd), states_dtype))
  kern = functools.partial(_fwd_kernel, scale=scale, c=c, n_chunks=t // c)
  return _call(kern, (b, h, vd // blocks.block_v), [rk, rk, vv, rk, uu, state], outs, shapes,
               blocks, interpret, "rwkv6_fwd")(r, k, v, w, u, h0)


def backward(r, k, v, w, u, states, do, ds, *, scale, blocks, interpret):
  """Returns dr, dk, dw `[B, T, H, K]` float32, dv in v's dtype, dh0, du `[H, K]` float32."""
  b, t, h, kd = r.shape
  vd = v.shape[3]
  c = blocks.chunk
  nv = vd // blocks.block_v
  rk, vv, uu, state, st_spec, part, upart = _specs(t, kd, blocks)
  part_shape = jax.ShapeDtypeStruct((nv, b, t, h, kd), _F32)
  kern = functools.partial(_bwd_kernel, scale=scale, c=c, n_chunks=t // c)
  dr, dk, dv, dh0, dw, du = _call(
      kern, (b, h, nv), [rk, rk, vv, vv, rk, uu, st_spec, state],
      [part, part, vv, state, part, upart],
      [part_shape, part_shape, jax.ShapeDtypeStruct(v.shape, v.dtype),
       jax.ShapeDtypeStruct((b, h, kd, vd), _F32), part_shape,
       jax.ShapeDtypeStruct((nv, b, h, kd), _F32)],
      blocks, interpret, "rwkv6_bwd")(r, k, v, do, w, u, states, ds)
  return dr.sum(0), dk.sum(0), dw.sum(0), dv, dh0, du.sum((0, 1))
