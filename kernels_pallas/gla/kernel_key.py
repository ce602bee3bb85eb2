"""Chunkwise gla kernels for the per-key gate `[B, T, H, K]`: bodies and pallas_calls.

Same grid as kernel.py (batch, value head, V block), state `[K, Vb]` float32 on chip, but the
decay now differs per key, so the intra-chunk scores need, for every pair s <= t of a chunk,
sum_k q_t[k] k_s[k] exp(seg(t, s)[k]) with seg(t, s) = g_{s+1} + .. + g_t. Factoring
exp(G_t - G_s) through cumsums overflows (exp(-G_s) under -20 per step) or, differenced,
loses eps·|G| of precision; the GLA paper's secondary chunking moves the problem into small
diagonal blocks. Here the chunk itself is small (C = 16 by default: the inter-chunk work per
token, 4KV flop, does not depend on C) and the diagonal block is built key column by key
column, walking s from C-1 down to 0 with the running sums

    R_s[t] = seg(t, s) = R_{s+1}[t] + g_{s+1}     (t > s; 0 at t = s)

Each step adds a gate <= 0 to sums of gates <= 0, so every exponent is exact to a few ulps of
itself (as `_chunk.segsum`) and never positive. Row C-1 of R_s is the decay of key s to the
chunk end (Γ - G_s), and after the walk R + g_0 is G itself (the decay from the chunk start),
so the kernels read only the raw (clamped) gates.

Forward per chunk: o = scale · (A v + (q ⊙ e^G) S), S <- e^Γ ⊙ S + (k ⊙ e^{Γ-G})ᵀ v, A the
causal per-key scores. The forward can also write the state entering each chunk (for the
backward; float32 for float32 inputs, else the input dtype).

Backward per chunk (reverse, carrying dS), with dP = scale · dO vᵀ and D_k the per-key decays:
    dq = sum_{s<=t} dP[t,s] k_s ⊙ D + scale · e^G ⊙ dO S_inᵀ
    dk = sum_{t>=s} dP[t,s] q_t ⊙ D + e^{Γ-G} ⊙ v dSᵀ
    dv = scale · Aᵀ dO + (k ⊙ e^{Γ-G}) dS
    dg_r = sum_{t>=r} (q ⊙ (dq_inter + dq_strict) - k ⊙ dk_strict)_t
           + sum_{s<r} (k ⊙ dk_state)_s + e^Γ ⊙ rowsum(dS ⊙ S_in)
(per key; "strict" leaves out the undecayed diagonal, which cancels exactly; see kernel.py for
why dg is formed from decayed terms only.)
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.gla.kernel import _F32, _call, _dot, _precision

_HI = lax.Precision.HIGHEST


def _walk(g_ref, k_ref, base, c, visit):
  """Walk the key columns s = c-1 .. 0 of a chunk; visit(s, R_s, k_s) -> None.

  Returns G `[c, K]` (decay from the chunk start) and TE `[c, K]` (row s: e^{Γ - G_s}).
  """
  tt = jnp.arange(c)[:, None]
  kd = k_ref.shape[-1]
  r = jnp.zeros((c, kd), _F32)
  te = jnp.zeros((c, kd), _F32)
  for s in reversed(range(c)):
    if s < c - 1:
      r = jnp.where(tt > s, r + g_ref[pl.ds(base + s + 1, 1), :], 0.0)   # seg(t, s)
    ks = k_ref[pl.ds(base + s, 1), :].astype(_F32)                        # [1, K]
    visit(s, r, ks)
    r_end = jnp.sum(jnp.where(tt == c - 1, r, 0.0), axis=0)               # [K]: Γ - G_s
    te = te + jnp.where(tt == s, jnp.exp(r_end)[None, :], 0.0)
  return r + g_ref[pl.ds(base, 1), :], te


def _split3(x):
  """float32 x as three bfloat16 parts x ≈ hi + mid + lo (to ~2^-24 |x|), for exact-ish
  float32 sums on the bf16 tensor cores."""
  hi = x.astype(jnp.bfloat16)
  r1 = x - hi.astype(_F32)
  mid = r1.astype(jnp.bfloat16)
  return hi, mid, (r1 - mid.astype(_F32)).astype(jnp.bfloat16)


def _tail_sums(g, cs):
  """[cs, K] -> row s: g_{s+1} + .. + g_{cs-1} per key, each a direct sum of its own gates
  (never a difference of cumsums), as a 0/1 triangle times g split in three bf16 parts."""
  idx = jnp.arange(cs)
  up = (idx[None, :] > idx[:, None]).astype(jnp.bfloat16)                # [s, r]: r > s
  tail = jnp.zeros(g.shape, _F32)
  for part in _split3(g):
    tail = tail + _dot(up, part, 1, 0, None)
  return tail


def _states_kernel(k_ref, v_ref, g_ref, h0_ref, st_ref, s_ref, *, cs, n_chunks):
  """"two_pass" forward, pass 1: the state entering every super-chunk of cs tokens, and the
  final state. Per-key decays, the same for gla and rwkv6: S <- e^Γ ⊙ S + (k ⊙ e^tail)ᵀ v."""
  cdt = v_ref.dtype
  prec = _precision(cdt)
  kd = k_ref.shape[-1]

  def body(n, s):
    rows = pl.ds(n * cs, cs)
    st_ref[pl.ds(n * kd, kd), :] = s.astype(st_ref.dtype)
    g = g_ref[rows, :]                                                    # [cs, K] float32
    k_out = (k_ref[rows, :].astype(_F32) * jnp.exp(_tail_sums(g, cs))).astype(cdt)
    return jnp.exp(jnp.sum(g, axis=0))[:, None] * s + _dot(k_out, v_ref[rows, :], 0, 0, prec)

  s_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))


def super_chunk_states(k, v, g, h0, *, blocks, interpret, name):
  """Pass 1 of the "two_pass" forward: (states entering each super-chunk `[B, H, Ns·K, V]` in
  v's dtype, final state `[B, H, K, V]` float32). k `[B, T, G, K]` (G divides H), g
  `[B, T, H, K]`."""
  b, t, h, kd = g.shape
  vd = v.shape[3]
  bv = blocks.block_v
  cs = blocks.super_chunk
  r = h // k.shape[2]
  keys = pl.BlockSpec((None, t, None, kd), lambda i, j, l: (i, 0, j // r, 0))
  rows = pl.BlockSpec((None, t, None, kd), lambda i, j, l: (i, 0, j, 0))
  vv = pl.BlockSpec((None, t, None, bv), lambda i, j, l: (i, 0, j, l))
  state = pl.BlockSpec((None, None, kd, bv), lambda i, j, l: (i, j, 0, l))
  states = pl.BlockSpec((None, None, (t // cs) * kd, bv), lambda i, j, l: (i, j, 0, l))
  return _call(functools.partial(_states_kernel, cs=cs, n_chunks=t // cs), (b, h, vd // bv),
               [keys, vv, rows, state], [states, state],
               [jax.ShapeDtypeStruct((b, h, (t // cs) * kd, vd), v.dtype),
                jax.ShapeDtypeStruct((b, h, kd, vd), _F32)], blocks, interpret, name)(k, v, g, h0)


def super_chunk_specs(t, h, hk, kd, blocks):
  """Pass 2 BlockSpecs over the grid (b, h, super-chunk n, V block l): q/k rows (q/k head
  j // (H/G)), per-value-head rows (gates), V rows, the entering state, the sub-chunk states."""
  r = h // hk
  bv, cs = blocks.block_v, blocks.super_chunk
  qk = pl.BlockSpec((None, cs, None, kd), lambda i, j, n, l: (i, n, j // r, 0))
  rows = pl.BlockSpec((None, cs, None, kd), lambda i, j, n, l: (i, n, j, 0))
  vv = pl.BlockSpec((None, cs, None, bv), lambda i, j, n, l: (i, n, j, l))
  h0 = pl.BlockSpec((None, None, kd, bv), lambda i, j, n, l: (i, j, n, l))
  sub = pl.BlockSpec((None, None, (cs // blocks.chunk) * kd, bv), lambda i, j, n, l: (i, j, n, l))
  return qk, rows, vv, h0, sub


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, h0_ref, o_ref, *refs, scale, c, n_chunks,
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

  def body(n, s_in):
    base = n * c
    rows = pl.ds(base, c)
    if st_ref:
      st_ref[0][pl.ds(n * kd, kd), :] = s_in.astype(st_ref[0].dtype)
    qf = q_ref[rows, :].astype(_F32)
    v = v_ref[rows, :]
    acc = {"a": jnp.zeros((c, c), _F32)}

    def visit(s, r, ks):
      dec = jnp.where(tt >= s, jnp.exp(r), 0.0)                           # [c, K]
      col = jnp.sum(qf * ks * dec, axis=1)                                # [c]
      acc["a"] = acc["a"] + jnp.where(cc == s, col[:, None], 0.0)

    gl, te = _walk(g_ref, k_ref, base, c, visit)
    gam = jnp.sum(jnp.where(tt == c - 1, gl, 0.0), axis=0)                # [K]
    o = _dot(acc["a"].astype(cdt), v, 1, 0, prec)
    o = o + _dot((qf * jnp.exp(gl)).astype(cdt), s_in.astype(cdt), 1, 0, prec)
    o_ref[rows, :] = (scale * o).astype(o_ref.dtype)
    k_out = (k_ref[rows, :].astype(_F32) * te).astype(cdt)
    return jnp.exp(gam)[:, None] * s_in + _dot(k_out, v, 0, 0, prec)

  s = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))
  if s_ref is not None:
    s_ref[...] = s


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, g_ref, st_ref, ds_ref,
                dq_ref, dk_ref, dv_ref, dh0_ref, dg_ref, *, scale, c, n_chunks):
  cdt = v_ref.dtype
  prec = _precision(cdt)
  kd = k_ref.shape[-1]
  tt = jnp.arange(c)[:, None]
  cc = jnp.arange(c)[None, :]
  after = (cc >= tt).astype(_F32)                                         # [r, t]: t >= r
  before = (cc < tt).astype(_F32)                                         # [r, s]: s < r

  def body(i, ds):
    n = n_chunks - 1 - i
    base = n * c
    rows = pl.ds(base, c)
    q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    qf, kf = q.astype(_F32), k.astype(_F32)
    s_in = st_ref[pl.ds(n * kd, kd), :].astype(_F32)                      # [K, Vb]
    dp = scale * _dot(do, v, 1, 1, prec)                                  # [t, s]
    dp_diag = jnp.sum(jnp.where(tt == cc, dp, 0.0), axis=1)               # [c]
    acc = {"a": jnp.zeros((c, c), _F32), "dq": jnp.zeros((c, kd), _F32),
           "dk": jnp.zeros((c, kd), _F32)}

    def visit(s, r, ks):
      qd = qf * jnp.where(tt > s, jnp.exp(r), 0.0)                        # [c, K], t > s
      acc["a"] = acc["a"] + jnp.where(cc == s, jnp.sum(qd * ks, axis=1)[:, None], 0.0)
      dp_col = jnp.sum(jnp.where(cc == s, dp, 0.0), axis=1)[:, None]      # [c, 1]
      acc["dq"] = acc["dq"] + dp_col * ks * jnp.where(tt > s, jnp.exp(r), 0.0)
      acc["dk"] = acc["dk"] + jnp.where(tt == s, jnp.sum(dp_col * qd, axis=0)[None, :], 0.0)

    gl, te = _walk(g_ref, k_ref, base, c, visit)
    eg = jnp.exp(gl)
    gam = jnp.sum(jnp.where(tt == c - 1, gl, 0.0), axis=0)                # [K]
    att = scale * (acc["a"] + jnp.where(tt == cc, jnp.sum(qf * kf, axis=1)[:, None], 0.0))
    ds_c = ds.astype(cdt)
    k_out = (kf * te).astype(cdt)
    dv = _dot(att.astype(cdt), do, 0, 0, prec) + _dot(k_out, ds_c, 1, 0, prec)
    dk_state = _dot(v, ds_c, 1, 1, prec) * te                             # [c, K]
    dq_inter = scale * _dot(do, s_in.astype(cdt), 1, 1, prec) * eg        # [c, K]
    dq_ref[rows, :] = acc["dq"] + dp_diag[:, None] * kf + dq_inter
    dk_ref[rows, :] = acc["dk"] + dp_diag[:, None] * qf + dk_state
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    x = qf * (dq_inter + acc["dq"]) - kf * acc["dk"]
    e = jnp.exp(gam) * jnp.sum(ds * s_in, axis=1)                         # [K]
    dg_ref[rows, :] = (_dot(after, x, 1, 0, _HI) + _dot(before, kf * dk_state, 1, 0, _HI)
                       + e[None, :])
    return (jnp.exp(gam)[:, None] * ds
            + scale * _dot((qf * eg).astype(cdt), do, 0, 0, prec))       # [K, Vb]

  dh0_ref[...] = lax.fori_loop(0, n_chunks, body, ds_ref[...].astype(_F32))


def _specs(t, h, hk, kd, blocks):
  r = h // hk
  bv = blocks.block_v
  qk = pl.BlockSpec((None, t, None, kd), lambda i, j, l: (i, 0, j // r, 0))
  gate = pl.BlockSpec((None, t, None, kd), lambda i, j, l: (i, 0, j, 0))
  vv = pl.BlockSpec((None, t, None, bv), lambda i, j, l: (i, 0, j, l))
  state = pl.BlockSpec((None, None, kd, bv), lambda i, j, l: (i, j, 0, l))
  states = pl.BlockSpec((None, None, (t // blocks.chunk) * kd, bv), lambda i, j, l: (i, j, 0, l))
  part = pl.BlockSpec((None, None, t, None, kd), lambda i, j, l: (l, i, 0, j, 0))
  return qk, gate, vv, state, states, part


def forward(q, k, v, g, h0, *, scale, blocks, interpret, states_dtype=None):
  """q, k `[B, T, G, K]`, v `[B, T, H, V]`, g clamped per-token gates `[B, T, H, K]` float32,
  h0 `[B, H, K, V]` (T % chunk == 0, V % block_v == 0).

  Returns (o, final state) and, given states_dtype, the state entering every chunk
  `[B, H, N·K, V]`."""
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  c = blocks.chunk
  if blocks.forward == "two_pass":
    return _forward_two_pass(q, k, v, g, h0, scale=scale, blocks=blocks, interpret=interpret,
                             states_dtype=states_dtype)
  qk, gate, vv, state, states, _ = _specs(t, h, hk, kd, blocks)
  outs, shapes = [vv, state], [jax.ShapeDtypeStruct(v.shape, v.dtype),
                               jax.ShapeDtypeStruct((b, h, kd, vd), _F32)]
  if states_dtype is not None:
    outs.append(states)
    shapes.append(jax.ShapeDtypeStruct((b, h, (t // c) * kd, vd), states_dtype))
  kern = functools.partial(_fwd_kernel, scale=scale, c=c, n_chunks=t // c)
  return _call(kern, (b, h, vd // blocks.block_v), [qk, qk, vv, gate, state], outs, shapes,
               blocks, interpret, "gla_key_fwd")(q, k, v, g, h0)


def _forward_two_pass(q, k, v, g, h0, *, scale, blocks, interpret, states_dtype):
  """Pass 1 (`super_chunk_states`), then one program per (b, h, super-chunk, V block) walking
  its cs / C chunks from the entering state (the "seq" body with the final state left out)."""
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  c, cs, bv = blocks.chunk, blocks.super_chunk, blocks.block_v
  h_in, s_fin = super_chunk_states(k, v, g, h0, blocks=blocks, interpret=interpret,
                                   name="gla_key_fwd_states")
  qk, rows, vv, h0s, sub = super_chunk_specs(t, h, hk, kd, blocks)
  outs, shapes = [vv], [jax.ShapeDtypeStruct(v.shape, v.dtype)]
  if states_dtype is not None:
    outs.append(sub)
    shapes.append(jax.ShapeDtypeStruct((b, h, (t // c) * kd, vd), states_dtype))
  kern = functools.partial(_fwd_kernel, scale=scale, c=c, n_chunks=cs // c, write_final=False)
  res = _call(kern, (b, h, t // cs, vd // bv), [qk, qk, vv, rows, h0s], outs, shapes,
              blocks, interpret, "gla_key_fwd_chunks")(q, k, v, g, h_in)
  return (res[0], s_fin) + tuple(res[1:])


def backward(q, k, v, g, states, do, ds, *, scale, blocks, interpret):
  """Returns dq, dk per value head `[B, T, H, K]` float32, dv in v's dtype, dh0 and dg
  `[B, T, H, K]` float32."""
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  c = blocks.chunk
  nv = vd // blocks.block_v
  qk, gate, vv, state, st_spec, part = _specs(t, h, hk, kd, blocks)
  part_shape = jax.ShapeDtypeStruct((nv, b, t, h, kd), _F32)
  kern = functools.partial(_bwd_kernel, scale=scale, c=c, n_chunks=t // c)
  dq, dk, dv, dh0, dg = _call(
      kern, (b, h, nv), [qk, qk, vv, vv, gate, st_spec, state], [part, part, vv, state, part],
      [part_shape, part_shape, jax.ShapeDtypeStruct(v.shape, v.dtype),
       jax.ShapeDtypeStruct((b, h, kd, vd), _F32), part_shape],
      blocks, interpret, "gla_key_bwd")(q, k, v, do, g, states, ds)
  return dq.sum(0), dk.sum(0), dv, dh0, dg.sum(0)
