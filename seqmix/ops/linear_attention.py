"""Linear attention with decays: `gla` (gated linear attention) and `rwkv6`.

Recurrences per value head (state `S` is `[K, V]`; `q_t`, `k_t`, `r_t`, `w_t` rows of length K):

    gla:    S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t         (decay, then write, then read)
            o_t = scale · q_t S_t
    rwkv6:  o_t = scale · r_t (S_{t-1} + diag(u) k_tᵀ v_t)    (read, with the bonus u on the
            S_t = diag(exp(w_t)) S_{t-1} + k_tᵀ v_t            current token, then decay, write)

`gla`'s gate is None (plain unnormalised linear attention), a fixed per-head decay `[H]`, a
per-head scalar `[B, T, H]` or a per-key gate `[B, T, H, K]` (`exp(g)` scales the rows of S).

Forms (`impl`):
  reference  token-by-token float32 `lax.scan` of the recurrences above: the oracle.
  chunked    chunks of C tokens: decay-masked matmuls inside a chunk, a `lax.scan` over chunks
             carrying the state, all other work as batched einsums over every chunk at once.
  pallas     `kernels_pallas/gla` (gla, every gate form): the chunkwise form in Pallas, one
             program per (batch, head, V block) carrying the state on chip across chunks;
             compiled through the Triton lowering on GPU, interpret mode elsewhere;
             `kernels_pallas/rwkv6` for rwkv6 (the per-key kernels, read before write, bonus).

Chunked maths. Inside a chunk (positions 0..C-1, entering state S_in), write
seg(t, s) = g_{s+1} + ... + g_t (a direct sum of gates, never a difference of two cumsums):

    o_t   = scale · (q_t ⊙ exp(seg(t, -1))) S_in + scale · sum_{s <= t} (q_t ⊙ k_s ⊙ exp(seg(t, s))) 1 · v_s
    S_out = diag(exp(seg(C-1, -1))) S_in + sum_s (k_s ⊙ exp(seg(C-1, s)))ᵀ v_s

Scalar (and fixed, and absent) gates: exp(seg) is one `[C, C]` matrix per head (the exact
`_chunk.segsum`), so the intra-chunk part is (q kᵀ ⊙ exp(seg)) v, and the decays of the
inter-chunk terms factor out of the matmuls.

Per-key gates: exp(seg) is `[C, C, K]`. Materialising it for the whole chunk is too large, and
the factorisation exp(G_t) · exp(-G_s) of a cumsum G overflows as soon as gates are strong. As in
fla's chunk_gla, the chunk is split into sub-chunks of c <= 8 tokens:
  * inside a sub-chunk (the diagonal blocks), the `[c, c, K]` pairwise sums come from `segsum`;
  * for s in an earlier sub-chunk than t, with n the first position of t's sub-chunk,
    seg(t, s) = seg(t, n-1) + seg(n-1, s): both parts are sums of gates <= 0, so
    q_t ⊙ exp(seg(t, n-1)) and k_s ⊙ exp(seg(n-1, s)) are both bounded by |q_t| and |k_s|.
Every exponent is a sum of gates (<= 0) taken directly from the gates, so nothing overflows and
no small decay loses precision to a large cumsum; `-inf` gates are clamped to
`_chunk.LOG_GATE_FLOOR` (a multiplier of ~1e-35, i.e. a reset), so no `inf - inf` appears.
rwkv6 reads S_{t-1}: its sums stop at t-1 (seg(t-1, s)), the intra-chunk mask is strictly lower
triangular, and the diagonal is the bonus term (r_t ⊙ u · k_t) v_t.

Grouped heads (gla): q/k have G heads dividing the H heads of v; value head j = g·R + r with
R = H/G uses q/k head g. Internally v, gates and states are viewed as `[..., G, R, ...]`.
"""

import jax.numpy as jnp
from jax import lax

from seqmix.ops import _chunk
from seqmix.ops._impl import resolve

_AVAILABLE = {"reference": True, "chunked": True, "pallas": True}
_AVAILABLE_RWKV6 = {"reference": True, "chunked": True, "pallas": True}
_AUTO = {"default": "chunked"}
# gla's GPU `auto` by gate form, from one H200 run (2026-12-04, bf16 B=8 T=4096 H=16 K=V=128,
# README "Pallas kernels"): the kernels win forward and forward+backward for no, fixed and
# scalar gates; per-key gates (and rwkv6) stay chunked: the kernels' backward is no faster.
_AUTO_SCALAR_GATES = {
    "gpu": "pallas", "default": "chunked",
    "why": {"gpu": "H200 2026-12-04, bf16 B=8 T=4096 H=16 K=V=128, ms fwd / fwd+bwd: fixed gate "
                   "pallas 0.713 (seq fwd) / 6.17 vs chunked 3.24 / 8.20; scalar gate 1.16 / "
                   "6.51 vs 3.35 / 9.07; no gate pallas 0.63 / 1.80"}}
_AUTO_PER_KEY = {
    "default": "chunked",
    "why": {"gpu": "H200 2026-12-04: per-key pallas 5.85 / 45.3 ms fwd / fwd+bwd against "
                   "chunked 9.96 / 52.0 (an earlier run), rwkv6 pallas 5.94 / 54.9 vs 9.94 / "
                   "52.6: not shown to win in one run"}}


def gla_auto(g) -> dict:
  """The `auto` table of `gla` for gate `g` (None, [H], [B, T, H] or [B, T, H, K])."""
  return _AUTO_PER_KEY if g is not None and jnp.ndim(g) == 4 else _AUTO_SCALAR_GATES

# Largest sub-chunk of the per-key form: its diagonal blocks hold a [c, c, K] float32 tensor
# per sub-chunk (c floats per query/key element), its off-diagonal blocks keys decayed to each
# of the C/c sub-chunk starts (C/c floats per key element). On an H100 (B=8, T=4096, H=16,
# K=V=128, bf16, C=64) c=8 ran fwd 11.0 / fwd+bwd 69 ms, c=16 13.6 / 74 ms, c=32 19.9 / 107 ms.
_MAX_SUB_CHUNK = 8

# The oracle's products run at full float32 precision on every backend (GPUs would otherwise
# use TF32 for float32 matmuls).
_HIGHEST = lax.Precision.HIGHEST
_F32 = jnp.float32


def gla(q, k, v, g=None, *, scale=None, initial_state=None, chunk_size: int = 64,
        impl: str = "auto"):
  """Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t, o_t = scale · q_t S_t.

  Args:
    q: queries `[B, T, G, K]` (G divides H; value head j uses q/k head j // (H/G)).
    k: keys `[B, T, G, K]`.
    v: values `[B, T, H, V]`.
    g: natural-log gates (<= 0; `-inf` resets the state): None (no decay), `[H]` (fixed
      per-head decay), `[B, T, H]` (per-head scalar) or `[B, T, H, K]` (per key).
    scale: output scale; default `K ** -0.5`.
    initial_state: float32 `[B, H, K, V]` or None (zeros).
    chunk_size: tokens per chunk of the chunked form (16 to 128 are tested).
    impl: "reference" | "chunked" | "pallas" | "auto".

  Returns:
    (o `[B, T, H, V]` in the dtype of v, final state float32 `[B, H, K, V]`).
  """
  _check_qkv("gla", "q", q, k, v)
  _check_chunk("gla", chunk_size)
  impl = resolve("gla", impl, _AVAILABLE, gla_auto(g))
  b, t, _, kd = q.shape
  h = v.shape[2]
  h0 = _initial_state("gla", initial_state, b, h, kd, v.shape[3])
  if scale is None:
    scale = kd ** -0.5
  if impl == "pallas" and g is not None and jnp.shape(g) == (h,):
    # A fixed gate stays [H] down to the kernels (kernels_pallas/gla/kernel.py says why).
    return _pallas(q, k, v, _chunk.clamp_log_gate(jnp.asarray(g).astype(_F32)), h0, scale,
                   chunk_size)
  g = _gla_gate(g, b, t, h, kd)
  if impl == "reference":
    return _reference(q, k, v, g, h0, scale, bonus=None)
  if impl == "pallas":
    return _pallas(q, k, v, g, h0, scale, chunk_size)
  if g is not None and g.ndim == 4:
    return _chunked_per_key(q, k, v, g, h0, scale, chunk_size, bonus=None)
  return _chunked_scalar(q, k, v, g, h0, scale, chunk_size)


def rwkv6(r, k, v, w, u, *, scale=1.0, initial_state=None, chunk_size: int = 64,
          impl: str = "auto"):
  """RWKV-6 (Finch) wkv: o_t = scale · r_t (S_{t-1} + diag(u) k_tᵀ v_t), then decay and write.

  S_t = diag(exp(w_t)) S_{t-1} + k_tᵀ v_t.

  Args:
    r: receptance (queries) `[B, T, H, K]`.
    k: keys `[B, T, H, K]`.
    v: values `[B, T, H, V]`.
    w: natural-log decays `[B, T, H, K]` (<= 0; `-inf` resets the state).
    u: bonus of the current token `[H, K]`.
    scale: output scale; default 1.0 (as RWKV layers use).
    initial_state: float32 `[B, H, K, V]` or None (zeros).
    chunk_size: tokens per chunk of the chunked form (16 to 128 are tested).
    impl: "reference" | "chunked" | "pallas" | "auto".

  Returns:
    (o `[B, T, H, V]` in the dtype of v, final state float32 `[B, H, K, V]`).
  """
  _check_qkv("rwkv6", "r", r, k, v)
  _check_chunk("rwkv6", chunk_size)
  impl = resolve("rwkv6", impl, _AVAILABLE_RWKV6, _AUTO_PER_KEY)
  b, t, hk, kd = r.shape
  h = v.shape[2]
  if hk != h:
    raise ValueError(f"rwkv6: r/k and v need the same number of heads; got {r.shape=} and "
                     f"{v.shape=}.")
  if w.shape != r.shape:
    raise ValueError(f"rwkv6: w must be [B, T, H, K] = {r.shape}; got {w.shape=}.")
  if u.shape != (h, kd):
    raise ValueError(f"rwkv6: u must be [H, K] = {(h, kd)}; got {u.shape=}.")
  h0 = _initial_state("rwkv6", initial_state, b, h, kd, v.shape[3])
  w = _chunk.clamp_log_gate(w.astype(_F32))
  u = u.astype(_F32)
  if impl == "reference":
    return _reference(r, k, v, w, h0, scale, bonus=u)
  if impl == "pallas":
    from kernels_pallas.rwkv6 import ops as rwkv6_pallas   # kernels load only when asked for
    return rwkv6_pallas.rwkv6(r, k, v, w, u, h0, scale=scale)
  return _chunked_per_key(r, k, v, w, h0, scale, chunk_size, bonus=u)


def _pallas(q, k, v, g, h0, scale, chunk_size):
  """gla through kernels_pallas/gla; g None | [H] | [B, T, H] | [B, T, H, K] (clamped)."""
  from kernels_pallas.gla import ops as gla_pallas   # kernels load only when asked for
  if g is not None and g.ndim > 1:
    g = jnp.broadcast_to(g, (q.shape[0],) + g.shape[1:])                # [b, t, h(, k)]
  # The chunk_size argument tunes the chunked form; the kernels pick their own (64 tokens for
  # scalar gates, 16 for per-key gates: kernels_pallas/gla/NOTES.md).
  del chunk_size
  return gla_pallas.gla(q, k, v, g, h0, scale=scale)


def _check_qkv(op, qname, q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{op}: {qname}, k, v must be [B, T, H, D]; got {q.shape=}, {k.shape=}, "
                     f"{v.shape=}.")
  if q.shape != k.shape:
    raise ValueError(f"{op}: {qname} and k must have the same shape; got {q.shape=}, {k.shape=}.")
  if v.shape[:2] != q.shape[:2]:
    raise ValueError(f"{op}: v must share batch and time with {qname}; got {q.shape=}, "
                     f"{v.shape=}.")
  if v.shape[2] % q.shape[2]:
    raise ValueError(f"{op}: the {q.shape[2]} heads of {qname}/k must divide the {v.shape[2]} "
                     f"heads of v; got {q.shape=}, {v.shape=}.")


def _check_chunk(op, chunk_size):
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"{op}: chunk_size must be a positive int (16 to 128 are tested); got "
                     f"{chunk_size!r}.")


def _initial_state(op, h0, b, h, kd, vd):
  if h0 is None:
    return jnp.zeros((b, h, kd, vd), _F32)
  if h0.shape != (b, h, kd, vd):
    raise ValueError(f"{op}: initial_state must be [B, H, K, V] = {(b, h, kd, vd)}; got "
                     f"{h0.shape=}.")
  return h0.astype(_F32)


def _gla_gate(g, b, t, h, kd):
  """None | [H] | [B,T,H] | [B,T,H,K] -> None | [1,T,H] | [B,T,H] | [B,T,H,K], float32, clamped."""
  if g is None:
    return None
  # float32 before broadcasting: the gradient of a fixed gate sums B·T cotangents.
  g = jnp.asarray(g).astype(_F32)
  if g.shape == (h,):
    # [1, T, H], broadcast against the batch later: a fixed gate is often a compile-time
    # constant, and XLA constant-folds the gate sums at whatever size they are given (at B=500
    # that took seconds of compile time).
    g = jnp.broadcast_to(g, (1, t, h))
  elif g.shape not in ((b, t, h), (b, t, h, kd)):
    raise ValueError(f"gla: g must be None, [H] = {(h,)}, [B, T, H] = {(b, t, h)} or "
                     f"[B, T, H, K] = {(b, t, h, kd)}; got {g.shape=}.")
  return _chunk.clamp_log_gate(g)


def _reference(q, k, v, g, h0, scale, bonus):
  """Token-by-token float32 scan. g None | [B,T,H] | [B,T,H,K]; bonus None (gla) | [H,K] (rwkv6)."""
  b, t, gk, kd = q.shape
  h = v.shape[2]
  q = jnp.repeat(q.astype(_F32), h // gk, axis=2)   # [b, t, h, k]
  k = jnp.repeat(k.astype(_F32), h // gk, axis=2)
  if g is None:
    g = jnp.zeros((b, t, h, kd), _F32)
  elif g.ndim == 3:
    g = jnp.broadcast_to(g[..., None], (b, t, h, kd))
  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v.astype(_F32), g))   # [t, b, h, d]

  def step(s, x):
    qt, kt, vt, gt = x
    kv = kt[..., :, None] * vt[..., None, :]                         # [b, h, k, v]
    if bonus is None:
      s = jnp.exp(gt)[..., None] * s + kv
      o = jnp.einsum("bhk,bhkv->bhv", qt, s, precision=_HIGHEST)
    else:
      o = jnp.einsum("bhk,bhkv->bhv", qt, s + bonus[..., None] * kv, precision=_HIGHEST)
      s = jnp.exp(gt)[..., None] * s + kv
    return s, o

  s, o = lax.scan(step, h0, xs)
  return (scale * jnp.moveaxis(o, 0, 1)).astype(v.dtype), s


def _chunked_inputs(q, k, v, h0, c):
  """Pad time to a multiple of c (zero q/k/v) and view heads as groups.

  Returns q, k `[b, n, c, g, k]`, v `[b, n, c, g, r, v]`, h0 `[b, g, r, k, v]`.
  """
  b, t, gk, _ = q.shape
  h, vd = v.shape[2], v.shape[3]
  chunk = lambda x: _chunk.to_chunks(_chunk.pad_time(x, c)[0], c)
  v = v.reshape(b, t, gk, h // gk, vd)                               # [b, t, g, r, v]
  return chunk(q), chunk(k), chunk(v), h0.reshape(b, gk, h // gk, *h0.shape[2:])


def _chunk_gate(a, c, gk):
  """[B,T,H(,K)] -> [b, n, c, g, r(, k)], padded with 0 (no decay) past T."""
  b, t, h = a.shape[:3]
  a = a.reshape(b, t, gk, h // gk, *a.shape[3:])
  return _chunk.to_chunks(_chunk.pad_time(a, c)[0], c)


def _finish(o, state, t, v):
  """o `[b, n, c, g, r, v]`, state `[b, g, r, k, v]` -> (`[B, T, H, V]` in v's dtype, `[B, H, K, V]`)."""
  b = o.shape[0]
  o = _chunk.from_chunks(o)[:, :t]                                    # [b, t, g, r, v]
  o = o.reshape(b, t, -1, o.shape[-1]).astype(v.dtype)                # [b, t, h, v]
  return o, state.reshape(b, -1, *state.shape[3:])                    # [b, h, k, v]


def _scan_states(h0, kv, decay):
  """States entering each chunk, and the final state.

  h0 `[b, g, r, k, v]`; kv `[b, n, g, r, k, v]` (each chunk's writes decayed to its end);
  decay: None or the chunk's total multiplier, broadcastable to kv.
  Returns (`[b, n, g, r, k, v]`, `[b, g, r, k, v]`).
  """
  xs = (jnp.moveaxis(kv, 1, 0), None if decay is None else jnp.moveaxis(decay, 1, 0))

  def step(s, x):
    kv_n, d_n = x
    return (s if d_n is None else d_n * s) + kv_n, s

  final, states = lax.scan(step, h0, xs)
  return jnp.moveaxis(states, 0, 1), final


def _chunked_scalar(q, k, v, g, h0, scale, c):
  """gla with g None or scalar `[B, T, H]` (clamped float32)."""
  t, gk = q.shape[1], q.shape[2]
  cdt = jnp.result_type(q.dtype, k.dtype, v.dtype)
  qc, kc, vc, h0 = _chunked_inputs(q, k, v, h0, c)
  f32 = {"preferred_element_type": _F32}
  qk = jnp.einsum("bntgk,bnsgk->bngts", qc, kc, **f32)              # [b, n, g, t, s]
  if g is None:
    att = jnp.where(jnp.tril(jnp.ones((c, c), bool)), qk, 0.0).astype(cdt)
    o = jnp.einsum("bngts,bnsgrv->bntgrv", att, vc, **f32)           # [b, n, t, g, r, v]
    kv = jnp.einsum("bnsgk,bnsgrv->bngrkv", kc, vc, **f32)           # [b, n, g, r, k, v]
    states, final = _scan_states(h0, kv, None)
    o = o + jnp.einsum("bntgk,bngrkv->bntgrv", qc, states, **f32)
    return _finish(scale * o, final, t, v)

  a = _chunk_gate(g, c, gk)                                          # [b, n, c, g, r]
  seg = _chunk.segsum(a, axis=2)                                     # [b, n, g, r, t, s]
  att = (qk[:, :, :, None] * jnp.exp(seg)).astype(cdt)               # [b, n, g, r, t, s]
  o = jnp.einsum("bngrts,bnsgrv->bntgrv", att, vc, **f32)            # [b, n, t, g, r, v]
  # Writes decayed to the chunk end: the last row of the exact pairwise sums.
  to_end = jnp.exp(jnp.moveaxis(seg[..., -1, :], -1, 2))            # [b, n, s, g, r]
  kv = jnp.einsum("bnsgk,bnsgrv->bngrkv", kc, (vc * to_end[..., None]).astype(cdt), **f32)
  from_start = jnp.cumsum(a, axis=2)                                 # [b, n, t, g, r]
  total = jnp.exp(from_start[:, :, -1])[..., None, None]             # [b, n, g, r, 1, 1]
  states, final = _scan_states(h0, kv, total)
  o_inter = jnp.einsum("bntgk,bngrkv->bntgrv", qc, states, **f32)
  o = o + jnp.exp(from_start)[..., None] * o_inter
  return _finish(scale * o, final, t, v)


def _sub_chunk(c):
  """Largest divisor of c that is at most _MAX_SUB_CHUNK."""
  return max(d for d in range(1, min(c, _MAX_SUB_CHUNK) + 1) if c % d == 0)


def _shift_right(x, axis, fill=0.0):
  """x[..., i, ...] -> x[..., i-1, ...] along axis, `fill` at i = 0 (exclusive sums, exactly)."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 0)
  return lax.slice_in_dim(jnp.pad(x, pad, constant_values=fill), 0, x.shape[axis], axis=axis)


def _rev_sum_after(a, axis):
  """out[s] = sum_{r > s} a[r] along axis, as a direct (reverse) sum."""
  incl = lax.cumsum(a, axis=axis, reverse=True)
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, 1)
  return lax.slice_in_dim(jnp.pad(incl, pad), 1, a.shape[axis] + 1, axis=axis)


def _chunked_per_key(q, k, v, g, h0, scale, c, bonus):
  """gla with per-key gates `[B, T, H, K]` (bonus None) or rwkv6 (bonus u `[H, K]`).

  rwkv6 reads the state before the current write: its decay sums stop one token earlier and the
  current token enters only through the bonus.
  """
  t, gk = q.shape[1], q.shape[2]
  strict = bonus is not None
  cdt = jnp.result_type(q.dtype, k.dtype, v.dtype)
  f32 = {"preferred_element_type": _F32}
  qc, kc, vc, h0 = _chunked_inputs(q, k, v, h0, c)
  a = _chunk_gate(g, c, gk)                                          # [b, n, c, g, r, k]
  bsz, n = a.shape[:2]

  # Inter-chunk: queries decayed from the chunk start, keys to the chunk end.
  from_start = jnp.cumsum(a, axis=2)                                 # seg(t, -1)
  read = _shift_right(from_start, 2) if strict else from_start
  q_in = (qc[:, :, :, :, None] * jnp.exp(read)).astype(cdt)          # [b, n, t, g, r, k]
  k_out = (kc[:, :, :, :, None] * jnp.exp(_rev_sum_after(a, 2))).astype(cdt)
  kv = jnp.einsum("bnsgrk,bnsgrv->bngrkv", k_out, vc, **f32)         # [b, n, g, r, k, v]
  total = jnp.exp(from_start[:, :, -1])[..., None]                   # [b, n, g, r, k, 1]
  states, final = _scan_states(h0, kv, total)
  o = jnp.einsum("bntgrk,bngrkv->bntgrv", q_in, states, **f32)       # [b, n, t, g, r, v]

  # Intra-chunk, diagonal blocks: exact [c, c, K] pairwise sums inside each sub-chunk.
  cs = _sub_chunk(c)
  m = c // cs
  sub = lambda x: x.reshape(bsz, n, m, cs, *x.shape[3:])             # [b, n, m, cs, ...]
  a_sub = sub(a)                                                     # [b, n, m, cs, g, r, k]
  pair = _chunk.segsum(a_sub, axis=3)                                # [b, n, m, g, r, k, t, s]
  if strict:
    pair = _shift_right(pair, pair.ndim - 2, fill=-jnp.inf)         # seg(t-1, s), s < t only
  # An elementwise product and a reduction over K (one fused loop), not a batched dot_general
  # with the [t, s] pairs as batch dimensions.
  decay = jnp.exp(jnp.moveaxis(pair, 5, -1))                         # [b, n, m, g, r, t, s, k]
  q_t = jnp.moveaxis(sub(qc), 3, 4)[:, :, :, :, None, :, None, :]    # [b, n, m, g, 1, t, 1, k]
  k_s = jnp.moveaxis(sub(kc), 3, 4)[:, :, :, :, None, None, :, :]    # [b, n, m, g, 1, 1, s, k]
  att = jnp.sum(q_t.astype(_F32) * k_s.astype(_F32) * decay, axis=-1)  # [b, n, m, g, r, t, s]
  o_intra = jnp.einsum("bnmgrts,bnmsgrv->bnmtgrv", att.astype(cdt), sub(vc), **f32)

  if m > 1:
    # Earlier sub-chunks, through the first position n_i of the query's sub-chunk i:
    # q_t ⊙ exp(seg(t, n_i - 1)) times k_s ⊙ exp(seg(n_i - 1, s)), both factors <= 1.
    local = jnp.cumsum(a_sub, axis=3)                                # seg(t, n_i - 1)
    if strict:
      local = _shift_right(local, 3)
    q_off = (sub(qc)[:, :, :, :, :, None] * jnp.exp(local)).astype(cdt)  # [b, n, m, t, g, r, k]
    starts = jnp.arange(m) * cs
    before = jnp.arange(c)[None, :] < starts[:, None]                # [m, c]: s < n_i
    a_before = jnp.where(before[:, :, None, None, None], a[:, :, None], 0.0)  # [b, n, m, c, g, r, k]
    k_off = kc[:, :, None, :, :, None] * jnp.exp(_rev_sum_after(a_before, 3))
    att = jnp.einsum("bnmtgrk,bnmsgrk->bnmgrts", q_off, k_off.astype(cdt), **f32)
    att = jnp.where(before[:, None, None, None, :], att, 0.0)        # [b, n, m, g, r, t, s]
    o_intra = o_intra + jnp.einsum("bnmgrts,bnsgrv->bnmtgrv", att.astype(cdt), vc, **f32)

  o = o + o_intra.reshape(o.shape)
  if strict:
    # rwkv6 has G = H, R = 1: u [H, K] -> [g, r, k].
    u = bonus.reshape(gk, -1, bonus.shape[-1])
    diag = jnp.einsum("bntgk,grk,bntgk->bntgr", qc, u, kc, **f32)   # [b, n, t, g, r]
    o = o + diag[..., None] * vc
  return _finish(scale * o, final, t, v)
