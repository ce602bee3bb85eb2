"""Chunkwise gla kernels (scalar, fixed or no gate): block sizes, then the kernel bodies.

Forward: one program per (batch, value head, V block) walks the chunks of C tokens in order,
keeping the `[K, Vb]` float32 state on chip. Inside a chunk, with g the raw (clamped) log gates,
G the chunk-local inclusive cumsum (G_t = g_0 + .. + g_t, formed in the kernel) and Γ = G_{C-1}
the chunk's total:

    D[t, s]  = exp(G_t - G_s) for s <= t, else 0                      (both <= 1)
    o        = scale · ((q kᵀ ⊙ D) v + (q ⊙ exp(G)) S)
    S       <- exp(Γ) S + (k ⊙ exp(Γ - G))ᵀ v

Every exponent is a sum of gates <= 0 measured inside one chunk, so nothing overflows; the
caller clamps -inf gates (`_chunk.clamp_log_gate`) so no inf - inf appears.

Gates reach the kernels raw, in one of three forms (static `gate`): "none"; "token" (`[B, H, T]`,
zero on the padded tokens); "fixed" (`[H, C]`: one chunk's gates, the same for every chunk, with
the padded tokens of the last chunk zeroed in the kernel from the static valid length). A fixed
gate never becomes a `[B, H, T]` array or an XLA cumsum: XLA constant-folded those (the gate of
retnet-style mixers is a compile-time constant) for seconds at every compile.

Backward (given dO and the cotangent dS of the state leaving each chunk). Per chunk:

    dq = scale · ((dO vᵀ ⊙ D) k + exp(G) ⊙ dO S_inᵀ)
    dk = scale · (dO vᵀ ⊙ D)ᵀ q + exp(Γ - G) ⊙ v dSᵀ
    dv = scale · (q kᵀ ⊙ D)ᵀ dO + (k ⊙ exp(Γ - G)) dS
    dS_in = exp(Γ) dS + scale · (q ⊙ exp(G))ᵀ dO

Two schemes (static `Blocks.backward`):
  "seq"       (the first version): a states kernel replays the forward and writes the state
              entering each chunk (float32); one kernel per (batch, head, V block) walks the
              chunks in reverse carrying dS and forms everything. 256 long serial programs
              holding S_in, dS and the C×C tiles at once: measured 11.4 ms fwd+bwd on the H200.
  "two_pass"  the forward (under `jax.vjp`) also writes the state entering each chunk (in the
              inputs' dtype: it only feeds products in that dtype); a reverse kernel per (batch,
              head, V block) writes dS of every chunk (the only serial part: one [K, C]·[C, Vb]
              product a chunk); then one program per (batch, head, chunk), all independent,
              forms dq, dk, dv, dg of its chunk from S_in and dS, looping over V blocks inside
              (so dq, dk, dg are complete: no per-V-block partial sums).

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
~1e3 under strong gates), so the backward forms the pairwise sums seg[t, s] = g_{s+1} + .. + g_t
as one float32 product (L ⊙ g) U with the 0/1 triangles L, U (each entry a sum of exactly its
own gates, as `_chunk.segsum`): one C×C×C float32 product per chunk, in the backward only.

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
BACKWARDS = ("seq", "two_pass")


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Static parameters of the gla kernels.

  chunk: tokens per chunk C (a power of two >= 16: Triton dots need dims >= 16).
  block_v: value columns per program (a power of two >= 16; the op pads V up to it).
  num_warps, num_stages: Triton launch parameters (ignored in interpret mode).
  backward: "two_pass" or "seq" (module docstring).
  chunk_warps: num_warps of the two-pass backward's per-chunk kernel (it holds dq, dk
    accumulators and the C×C tiles at once: more warps, fewer registers per thread).
  forward: "two_pass" (a states kernel over super-chunks, then one program per super-chunk
    and V block walking its chunks) or "seq" (one serial program per head and V block walking
    every chunk); here and in kernel_key.py.
  super_chunk: tokens per super-chunk of the "two_pass" forward (a multiple of chunk; equal
    to chunk here means "seq").
  """
  chunk: int = 64
  block_v: int = 64
  num_warps: int = 4
  num_stages: int = 2
  backward: str = "two_pass"
  chunk_warps: int = 8
  forward: str = "two_pass"
  super_chunk: int = 64


def _dot(a, b, ca, cb, prec):
  """a·b contracting a's dim ca with b's dim cb (2-D), float32 accumulation."""
  return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=prec,
                         preferred_element_type=_F32)


def _precision(dtype):
  # float32 inputs: IEEE products on the GPU (the default would be TF32, ~1e-3 relative).
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _gate_row(g_ref, n, c, gate, t_valid, whole_t, chunk0=0):
  """The raw gates [c] float32 of chunk n (None without gates).

  whole_t: the ref holds the sequence (or a super-chunk: "token" gates are sliced to chunk n);
  else it holds chunk n only. "fixed" refs hold one chunk's c gates; tokens past t_valid get
  0, chunk0 + n is the chunk's global index."""
  if gate == "none":
    return None
  if gate == "token":
    return g_ref[pl.ds(n * c, c)] if whole_t else g_ref[...]
  pos = (chunk0 + n) * c + jnp.arange(c)
  return jnp.where(pos < t_valid, g_ref[...], 0.0)


def _chunk_gates(gr, c):
  """From the raw gates [c]: G [c], the total Γ, Γ - G [c] and the decay D [c, c].

  G_t = g_0 + .. + g_t and Γ - G_s = g_{s+1} + .. + g_{C-1} are each summed from their own
  gates: differencing two sums loses eps·|Γ| (1e-4 relative on the state under -20/step)."""
  idx = jnp.arange(c)
  causal = idx[:, None] >= idx[None, :]
  if gr is None:
    return None, None, None, causal.astype(_F32)
  row = gr[None, :]                                                    # [1, c]
  gc = jnp.sum(jnp.where(causal, row, 0.0), axis=1)                    # [c]: G_t
  tail = jnp.sum(jnp.where(idx[None, :] > idx[:, None], row, 0.0), axis=1)   # [c]: Γ - G_s
  gam = jnp.sum(gr)
  diff = jnp.where(causal, gc[:, None] - gc[None, :], 0.0)
  return gc, gam, tail, jnp.where(causal, jnp.exp(diff), 0.0)


def _exact_decay(gr, c):
  """exp(g_{s+1} + .. + g_t) for s <= t (0 above the diagonal), summed term by term. [c, c]"""
  idx = jnp.arange(c)
  lg = jnp.where(idx[:, None] >= idx[None, :], gr[None, :], 0.0)       # [t, r]: g_r, r <= t
  up = (idx[:, None] > idx[None, :]).astype(_F32)                      # [r, s]: r > s
  seg = _dot(lg, up, 1, 0, lax.Precision.HIGHEST)                      # [t, s]
  causal = idx[:, None] >= idx[None, :]
  return jnp.where(causal, jnp.exp(jnp.where(causal, seg, 0.0)), 0.0)


def _fwd_kernel(*refs, scale, c, n_chunks, gate, t_valid, write_states, super_chunk=None):
  """super_chunk None: the whole sequence from h0, writing the final state; else pass 2 of
  the "two_pass" forward: super-chunk program_id(2) of that many tokens from its entering state
  (h0_ref), no final state."""
  if gate == "none":
    q_ref, k_ref, v_ref, h0_ref, o_ref, *st = refs
    g_ref = None
  else:
    q_ref, k_ref, v_ref, g_ref, h0_ref, o_ref, *st = refs
  s_ref = None
  if super_chunk is None:
    s_ref, *st = st
  base = 0 if super_chunk is None else pl.program_id(2) * (super_chunk // c)
  cdt = v_ref.dtype
  prec = _precision(cdt)
  kd = k_ref.shape[-1]

  def body(n, s):
    rows = pl.ds(n * c, c)
    if write_states:
      st[0][pl.ds(n * kd, kd), :] = s.astype(st[0].dtype)
    q, k, v = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :]         # [c, K], [c, K], [c, Vb]
    gr = _gate_row(g_ref, n, c, gate, t_valid, True, chunk0=base)
    gc, gam, tail, d = _chunk_gates(gr, c)
    att = _dot(q, k, 1, 1, prec) * d                                   # [c, c]
    o = _dot(att.astype(cdt), v, 1, 0, prec)                           # [c, Vb]
    if gc is None:
      q_in, k_out, s_kept = q, k, s
    else:
      q_in = (q.astype(_F32) * jnp.exp(gc)[:, None]).astype(cdt)
      k_out = (k.astype(_F32) * jnp.exp(tail)[:, None]).astype(cdt)
      s_kept = jnp.exp(gam) * s
    o = o + _dot(q_in, s.astype(cdt), 1, 0, prec)
    o_ref[rows, :] = (scale * o).astype(o_ref.dtype)
    return s_kept + _dot(k_out, v, 0, 0, prec)                         # [K, Vb]

  s = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))
  if s_ref is not None:
    s_ref[...] = s


def _super_states_kernel(*refs, cs, n_chunks, gate, t_valid):
  """"two_pass" forward, pass 1: the state entering every super-chunk of cs tokens (in the
  states' dtype) and the final state: S <- e^Γ S + (k ⊙ e^{Γ-G})ᵀ v over cs tokens at once."""
  if gate == "none":
    k_ref, v_ref, h0_ref, st_ref, s_ref = refs
    g_ref = None
  else:
    k_ref, v_ref, g_ref, h0_ref, st_ref, s_ref = refs
  cdt = v_ref.dtype
  prec = _precision(cdt)
  kd = k_ref.shape[-1]
  idx = jnp.arange(cs)

  def body(n, s):
    rows = pl.ds(n * cs, cs)
    st_ref[pl.ds(n * kd, kd), :] = s.astype(st_ref.dtype)
    k, v = k_ref[rows, :], v_ref[rows, :]
    if g_ref is None:
      return s + _dot(k, v, 0, 0, prec)
    gr = _gate_row(g_ref, n, cs, gate, t_valid, True)
    # Γ - G_s summed from its own gates (see _chunk_gates).
    tail = jnp.sum(jnp.where(idx[None, :] > idx[:, None], gr[None, :], 0.0), axis=1)
    k_out = (k.astype(_F32) * jnp.exp(tail)[:, None]).astype(cdt)
    return jnp.exp(jnp.sum(gr)) * s + _dot(k_out, v, 0, 0, prec)

  s_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))


def _states_kernel(*refs, c, n_chunks, gate, t_valid):
  """The state entering every chunk (forward order), for the "seq" backward."""
  if gate == "none":
    k_ref, v_ref, h0_ref, st_ref = refs
    g_ref = None
  else:
    k_ref, v_ref, g_ref, h0_ref, st_ref = refs
  cdt = v_ref.dtype
  prec = _precision(cdt)
  kd = k_ref.shape[-1]

  def body(n, s):
    rows = pl.ds(n * c, c)
    st_ref[pl.ds(n * kd, kd), :] = s
    k, v = k_ref[rows, :], v_ref[rows, :]
    if g_ref is None:
      return s + _dot(k, v, 0, 0, prec)
    gc, gam, tail, _ = _chunk_gates(_gate_row(g_ref, n, c, gate, t_valid, True), c)
    k_out = (k.astype(_F32) * jnp.exp(tail)[:, None]).astype(cdt)
    return jnp.exp(gam) * s + _dot(k_out, v, 0, 0, prec)

  lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(_F32))


def _dstates_kernel(*refs, scale, c, n_chunks, gate, t_valid):
  """"two_pass": the cotangent of the state leaving every chunk (reverse order), and dh0."""
  if gate == "none":
    q_ref, do_ref, ds_ref, dst_ref, dh0_ref = refs
    g_ref = None
  else:
    q_ref, do_ref, g_ref, ds_ref, dst_ref, dh0_ref = refs
  cdt = do_ref.dtype
  prec = _precision(cdt)
  kd = q_ref.shape[-1]

  def body(i, ds):
    n = n_chunks - 1 - i
    rows = pl.ds(n * c, c)
    dst_ref[pl.ds(n * kd, kd), :] = ds.astype(dst_ref.dtype)
    q, do = q_ref[rows, :], do_ref[rows, :]
    gc, gam, tail, _ = _chunk_gates(_gate_row(g_ref, n, c, gate, t_valid, True), c)
    if gc is None:
      return ds + scale * _dot(q, do, 0, 0, prec)
    q_in = (q.astype(_F32) * jnp.exp(gc)[:, None]).astype(cdt)
    return jnp.exp(gam) * ds + scale * _dot(q_in, do, 0, 0, prec)     # [K, Vb]

  dh0_ref[...] = lax.fori_loop(0, n_chunks, body, ds_ref[...].astype(_F32))


def _dgate(dp, qk, q, dq_inter, k, dk_state, e, c):
  """dg_r of one chunk (module docstring) from its decayed terms. [c]"""
  idx = jnp.arange(c)
  m = jnp.where(idx[:, None] > idx[None, :], dp * qk, 0.0)             # [t, s]
  x = (jnp.sum(q.astype(_F32) * dq_inter, axis=1)
       + jnp.sum(m, axis=1) - jnp.sum(m, axis=0))                      # [c]
  y = jnp.sum(k.astype(_F32) * dk_state, axis=1)                       # [c]
  after = idx[:, None] <= idx[None, :]                                 # [r, t]: t >= r
  return (jnp.sum(jnp.where(after, x[None, :], 0.0), axis=1)
          + jnp.sum(jnp.where(after, 0.0, y[None, :]), axis=1) + e)


def _chunk_bwd_kernel(*refs, scale, c, gate, t_valid, block_v):
  """"two_pass": dq, dk, dv, dg of one chunk (program (b, h, n)); V blocks looped inside."""
  if gate == "none":
    q_ref, k_ref, v_ref, do_ref, st_ref, dst_ref, dq_ref, dk_ref, dv_ref = refs
    g_ref = dg_ref = None
  else:
    (q_ref, k_ref, v_ref, do_ref, g_ref, st_ref, dst_ref,
     dq_ref, dk_ref, dv_ref, dg_ref) = refs
  cdt = v_ref.dtype
  prec = _precision(cdt)
  n = pl.program_id(2)
  q, k = q_ref[...], k_ref[...]                                        # [c, K]
  kd = q.shape[-1]
  gr = _gate_row(g_ref, n, c, gate, t_valid, False)
  gc, gam, tail, d = _chunk_gates(gr, c)
  if gc is not None:
    d = _exact_decay(gr, c)
    to_end = jnp.exp(tail)[:, None]                                # [c, 1]
    k_out = (k.astype(_F32) * to_end).astype(cdt)
  else:
    k_out = k
  qk = _dot(q, k, 1, 1, prec)                                          # [t, s]
  att = ((scale * qk) * d).astype(cdt)
  dp = jnp.zeros((c, c), _F32)
  dq_inter = jnp.zeros((c, kd), _F32)
  dk_state = jnp.zeros((c, kd), _F32)
  e = jnp.zeros((), _F32)
  for j in range(v_ref.shape[-1] // block_v):
    cols = pl.ds(j * block_v, block_v)
    v, do = v_ref[:, cols], do_ref[:, cols]                            # [c, Vb]
    s_in, ds = st_ref[:, cols], dst_ref[:, cols]                       # [K, Vb]
    dp = dp + _dot(do, v, 1, 1, prec)
    dq_inter = dq_inter + _dot(do, s_in.astype(cdt), 1, 1, prec)
    dk_state = dk_state + _dot(v, ds.astype(cdt), 1, 1, prec)
    dv = _dot(att, do, 0, 0, prec) + _dot(k_out, ds.astype(cdt), 1, 0, prec)   # [c, Vb]
    dv_ref[:, cols] = dv.astype(dv_ref.dtype)
    if gc is not None:
      prod = ds.astype(_F32) * s_in.astype(_F32)
      e = e + jnp.sum(jnp.sum(prod, axis=1), axis=0)
  dp = (scale * dp) * d
  dq_inter = scale * dq_inter
  if gc is not None:
    dq_inter = dq_inter * jnp.exp(gc)[:, None]
    dk_state = dk_state * to_end
  dq_ref[...] = (_dot(dp.astype(cdt), k, 1, 0, prec) + dq_inter).astype(dq_ref.dtype)
  dk_ref[...] = (_dot(dp.astype(cdt), q, 0, 0, prec) + dk_state).astype(dk_ref.dtype)
  if gc is not None:
    dg_ref[...] = _dgate(dp, qk, q, dq_inter, k, dk_state, jnp.exp(gam) * e, c)


def _bwd_kernel(*refs, scale, c, n_chunks, gate, t_valid):
  """"seq": dq, dk (this V block's parts), dv, dh0 and dg (this V block's part), reverse order."""
  if gate == "none":
    q_ref, k_ref, v_ref, do_ref, st_ref, ds_ref, dq_ref, dk_ref, dv_ref, dh0_ref = refs
    g_ref = None
  else:
    (q_ref, k_ref, v_ref, do_ref, g_ref, st_ref, ds_ref,
     dq_ref, dk_ref, dv_ref, dh0_ref, dg_ref) = refs
  cdt = v_ref.dtype
  prec = _precision(cdt)
  kd = k_ref.shape[-1]

  def body(i, ds):
    n = n_chunks - 1 - i
    rows = pl.ds(n * c, c)
    q, k, v, do = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], do_ref[rows, :]
    s_in = st_ref[pl.ds(n * kd, kd), :]                                # [K, Vb] float32
    gr = _gate_row(g_ref, n, c, gate, t_valid, True)
    gc, gam, tail, d = _chunk_gates(gr, c)
    if gc is not None:
      d = _exact_decay(gr, c)
    qk = _dot(q, k, 1, 1, prec)                                        # [t, s]
    att = (scale * qk) * d
    dp = (scale * _dot(do, v, 1, 1, prec)) * d
    dq_inter = scale * _dot(do, s_in.astype(cdt), 1, 1, prec)          # [c, K]
    if gc is None:
      q_in, k_out, v_out, ds_kept = q, k, v, ds
    else:
      to_end = jnp.exp(tail)[:, None]
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
      e = jnp.exp(gam) * jnp.sum(jnp.sum(ds * s_in, axis=1), axis=0)
      dg_ref[rows] = _dgate(dp, qk, q, dq_inter, k, dk_state, e, c)
    dq_ref[rows, :] = dq
    dk_ref[rows, :] = dk
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return ds_kept + scale * _dot(q_in, do, 0, 0, prec)                # [K, Vb]

  dh0_ref[...] = lax.fori_loop(0, n_chunks, body, ds_ref[...].astype(_F32))


def _gate_spec(gate, t, c, whole_t):
  """BlockSpec of the gates over grids (b, h, l) (whole_t) or (b, h, n) (chunk n only)."""
  if gate == "none":
    return []
  if gate == "fixed":
    return [pl.BlockSpec((None, c), lambda i, j, l: (j, 0))]
  if whole_t:
    return [pl.BlockSpec((None, None, t), lambda i, j, l: (i, j, 0))]
  return [pl.BlockSpec((None, None, c), lambda i, j, n: (i, j, n))]


def _seq_specs(t, h, hk, kd, blocks):
  """BlockSpecs over the grid (b, h, l): time-major q/k/v rows, states, per-V-block parts."""
  r = h // hk
  bv = blocks.block_v
  qk = pl.BlockSpec((None, t, None, kd), lambda i, j, l: (i, 0, j // r, 0))
  vv = pl.BlockSpec((None, t, None, bv), lambda i, j, l: (i, 0, j, l))
  state = pl.BlockSpec((None, None, kd, bv), lambda i, j, l: (i, j, 0, l))
  part = pl.BlockSpec((None, None, t, None, kd), lambda i, j, l: (l, i, 0, j, 0))
  states = pl.BlockSpec((None, None, (t // blocks.chunk) * kd, bv), lambda i, j, l: (i, j, 0, l))
  gpart = pl.BlockSpec((None, None, None, t), lambda i, j, l: (l, i, j, 0))
  return qk, vv, state, part, gpart, states


def _call(kernel, grid, in_specs, out_specs, out_shape, blocks, interpret, name, num_warps=None):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=pltriton.CompilerParams(num_warps=num_warps or blocks.num_warps,
                                              num_stages=blocks.num_stages),
      interpret=interpret, name=name)


def gate_kind(g):
  """"none" | "fixed" (`[H, C]` one chunk's gates) | "token" (`[B, H, T]`)."""
  return "none" if g is None else ("fixed" if g.ndim == 2 else "token")


def forward(q, k, v, g, h0, *, scale, blocks, interpret, t_valid, states_dtype=None):
  """q, k `[B, T, G, K]`, v `[B, T, H, V]` (T % chunk == 0, V % block_v == 0), g None, raw
  clamped gates `[B, H, T]` float32 (zero past t_valid) or a fixed gate's one chunk `[H, C]`,
  h0 `[B, H, K, V]` float32; t_valid: the unpadded length.

  Returns (o `[B, T, H, V]` in v's dtype, final state `[B, H, K, V]` float32) and, given
  states_dtype, the state entering every chunk `[B, H, N·K, V]`."""
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  c = blocks.chunk
  if blocks.forward == "two_pass" and blocks.super_chunk > c:
    return _forward_two_pass(q, k, v, g, h0, scale=scale, blocks=blocks, interpret=interpret,
                             t_valid=t_valid, states_dtype=states_dtype)
  qk, vv, state, _, _, states = _seq_specs(t, h, hk, kd, blocks)
  gate = gate_kind(g)
  kern = functools.partial(_fwd_kernel, scale=scale, c=c, n_chunks=t // c, gate=gate,
                           t_valid=t_valid, write_states=states_dtype is not None)
  outs = [vv, state]
  shapes = [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((b, h, kd, vd), _F32)]
  if states_dtype is not None:
    outs.append(states)
    shapes.append(jax.ShapeDtypeStruct((b, h, (t // c) * kd, vd), states_dtype))
  ins = [q, k, v] + ([] if g is None else [g]) + [h0]
  specs = [qk, qk, vv] + _gate_spec(gate, t, c, True) + [state]
  return _call(kern, (b, h, vd // blocks.block_v), specs, outs, shapes,
               blocks, interpret, "gla_fwd")(*ins)


def _forward_two_pass(q, k, v, g, h0, *, scale, blocks, interpret, t_valid, states_dtype):
  """Pass 1 (`_super_states_kernel`: states entering each super-chunk of cs tokens), then one
  program per (b, h, super-chunk, V block) running `_fwd_kernel` over its cs / C chunks."""
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  c, cs, bv = blocks.chunk, blocks.super_chunk, blocks.block_v
  r = h // hk
  gate = gate_kind(g)
  gs = [] if g is None else [g]
  qk, vv, state, _, _, _ = _seq_specs(t, h, hk, kd, blocks)
  if gate == "fixed":
    g1 = [jnp.broadcast_to(g[:, :1], (h, cs))]                            # [h, cs]
    g1_spec = [pl.BlockSpec((None, cs), lambda i, j, l: (j, 0))]
  else:
    g1, g1_spec = gs, _gate_spec(gate, t, c, True)
  sup = pl.BlockSpec((None, None, (t // cs) * kd, bv), lambda i, j, l: (i, j, 0, l))
  h_in, s_fin = _call(
      functools.partial(_super_states_kernel, cs=cs, n_chunks=t // cs, gate=gate,
                        t_valid=t_valid),
      (b, h, vd // bv), [qk, vv] + g1_spec + [state], [sup, state],
      [jax.ShapeDtypeStruct((b, h, (t // cs) * kd, vd), v.dtype),
       jax.ShapeDtypeStruct((b, h, kd, vd), _F32)],
      blocks, interpret, "gla_fwd_states")(k, v, *g1, h0)
  q2 = pl.BlockSpec((None, cs, None, kd), lambda i, j, n, l: (i, n, j // r, 0))
  v2 = pl.BlockSpec((None, cs, None, bv), lambda i, j, n, l: (i, n, j, l))
  h2 = pl.BlockSpec((None, None, kd, bv), lambda i, j, n, l: (i, j, n, l))
  sub = pl.BlockSpec((None, None, (cs // c) * kd, bv), lambda i, j, n, l: (i, j, n, l))
  g2_spec = {"none": [], "fixed": [pl.BlockSpec((None, c), lambda i, j, n, l: (j, 0))],
             "token": [pl.BlockSpec((None, None, cs), lambda i, j, n, l: (i, j, n))]}[gate]
  outs, shapes = [v2], [jax.ShapeDtypeStruct(v.shape, v.dtype)]
  if states_dtype is not None:
    outs.append(sub)
    shapes.append(jax.ShapeDtypeStruct((b, h, (t // c) * kd, vd), states_dtype))
  kern = functools.partial(_fwd_kernel, scale=scale, c=c, n_chunks=cs // c, gate=gate,
                           t_valid=t_valid, write_states=states_dtype is not None,
                           super_chunk=cs)
  res = _call(kern, (b, h, t // cs, vd // bv), [q2, q2, v2] + g2_spec + [h2], outs, shapes,
              blocks, interpret, "gla_fwd_chunks")(q, k, v, *gs, h_in)
  return (res[0], s_fin) + tuple(res[1:])


def backward(q, k, v, g, h0, do, ds, *, scale, blocks, interpret, t_valid, states=None,
             dqk_dtype=_F32):
  """Cotangents of `forward`'s inputs given do `[B, T, H, V]` and ds `[B, H, K, V]`.

  states: "two_pass" only: the forward's states entering every chunk `[B, H, N·K, V]`.
  dqk_dtype: dtype of dq, dk ("two_pass"; "seq" sums float32 per-V-block parts).

  Returns dq, dk per value head `[B, T, H, K]` (not summed over the heads that share a q/k
  head), dv `[B, T, H, V]` in v's dtype, dh0 `[B, H, K, V]` float32, and dg `[B, H, T]`
  float32, the cotangent of each token's gate (a fixed gate's too; None without gates).
  """
  if blocks.backward == "two_pass":
    return _backward_two_pass(q, k, v, g, do, ds, states, scale=scale, blocks=blocks,
                              interpret=interpret, t_valid=t_valid, dqk_dtype=dqk_dtype)
  if blocks.backward != "seq":
    raise ValueError(f"gla pallas: backward={blocks.backward!r}; expected one of {BACKWARDS}.")
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  c = blocks.chunk
  nv = vd // blocks.block_v
  qk, vv, state, part, gpart, st_spec = _seq_specs(t, h, hk, kd, blocks)
  gate = gate_kind(g)
  grid = (b, h, nv)
  gs, gspec = ([] if g is None else [g]), _gate_spec(gate, t, c, True)
  common = dict(c=c, n_chunks=t // c, gate=gate, t_valid=t_valid)
  st = _call(functools.partial(_states_kernel, **common), grid,
             [qk, vv] + gspec + [state], st_spec,
             jax.ShapeDtypeStruct((b, h, (t // c) * kd, vd), _F32), blocks, interpret,
             "gla_bwd_states")(k, v, *gs, h0)
  part_shape = jax.ShapeDtypeStruct((nv, b, t, h, kd), _F32)
  outs = [part, part, vv, state] + ([] if g is None else [gpart])
  shapes = [part_shape, part_shape, jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((b, h, kd, vd), _F32)]
  shapes += [] if g is None else [jax.ShapeDtypeStruct((nv, b, h, t), _F32)]
  res = _call(functools.partial(_bwd_kernel, scale=scale, **common), grid,
              [qk, qk, vv, vv] + gspec + [st_spec, state], outs, shapes, blocks, interpret,
              "gla_bwd")(q, k, v, do, *gs, st, ds)
  dq, dk, dv, dh0 = res[:4]
  dg = None if g is None else res[4].sum(0)
  return dq.sum(0), dk.sum(0), dv, dh0, dg


def _backward_two_pass(q, k, v, g, do, ds, states, *, scale, blocks, interpret, t_valid,
                       dqk_dtype):
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  c = blocks.chunk
  bv = blocks.block_v
  n_chunks = t // c
  r = h // hk
  gate = gate_kind(g)
  gs = [] if g is None else [g]
  qk, vv, state, _, _, st_spec = _seq_specs(t, h, hk, kd, blocks)
  dst, dh0 = _call(
      functools.partial(_dstates_kernel, scale=scale, c=c, n_chunks=n_chunks, gate=gate,
                        t_valid=t_valid),
      (b, h, vd // bv), [qk, vv] + _gate_spec(gate, t, c, True) + [state], [st_spec, state],
      [jax.ShapeDtypeStruct(states.shape, states.dtype),
       jax.ShapeDtypeStruct((b, h, kd, vd), _F32)],
      blocks, interpret, "gla_bwd_dstates")(q, do, *gs, ds)
  # Grid (b, h, n): every program one chunk, all of V.
  qc = pl.BlockSpec((None, c, None, kd), lambda i, j, n: (i, n, j // r, 0))
  kc = pl.BlockSpec((None, c, None, kd), lambda i, j, n: (i, n, j, 0))
  vc = pl.BlockSpec((None, c, None, vd), lambda i, j, n: (i, n, j, 0))
  sc = pl.BlockSpec((None, None, kd, vd), lambda i, j, n: (i, j, n, 0))
  outs = [kc, kc, vc] + ([] if g is None else [pl.BlockSpec((None, None, c),
                                                             lambda i, j, n: (i, j, n))])
  dqk = jax.ShapeDtypeStruct((b, t, h, kd), dqk_dtype)
  shapes = [dqk, dqk, jax.ShapeDtypeStruct(v.shape, v.dtype)]
  shapes += [] if g is None else [jax.ShapeDtypeStruct((b, h, t), _F32)]
  res = _call(
      functools.partial(_chunk_bwd_kernel, scale=scale, c=c, gate=gate, t_valid=t_valid,
                        block_v=bv),
      (b, h, n_chunks), [qc, qc, vc, vc] + _gate_spec(gate, t, c, False) + [sc, sc], outs,
      shapes, blocks, interpret, "gla_bwd_chunks", num_warps=blocks.chunk_warps,
  )(q, k, v, do, *gs, states, dst)
  dq, dk, dv = res[:3]
  return dq, dk, dv, dh0, (None if g is None else res[3])
