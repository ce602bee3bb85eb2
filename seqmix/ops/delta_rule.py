"""The delta rule (DeltaNet) and the gated delta rule (Gated DeltaNet).

Recurrence per value head (state `S` is `[K, V]`, `k_t`, `q_t` rows of length K):

    S_t = exp(g_t) S_{t-1}                              (g = None: no decay)
    S_t = S_t + k_tᵀ (beta_t (v_t - k_t S_t))           (write the prediction error)
    o_t = scale · q_t S_t

Forms (`impl`):
  reference  token-by-token float32 `lax.scan` of the recurrence above: the oracle.
  chunked    the WY / UT form of Yang et al. 2024 ("Parallelizing Linear Transformers with
             the Delta Rule over Sequence Length"), gated as in Gated DeltaNet (Yang et al.
             2024b): inside a chunk of C tokens, one unit lower-triangular solve turns the C
             sequential rank-one writes into matmuls; a `lax.scan` carries the state across
             chunks.
  pallas     `kernels_pallas/delta_rule`: the same WY/UT chunked form in Pallas, one program per
             (batch, head, V block) walking the chunks with the state on chip, the triangular
             solve done in the kernel; compiled through the Triton lowering on GPU, interpret
             mode elsewhere. Its backward is a Pallas kernel too (the chunks in reverse,
             dS on chip, from the chunk states the forward stores); kernels_pallas'
             `backward="jax"` falls back to the VJP of `chunked` (see its NOTES.md).

Chunked maths. Inside a chunk starting from state S_0, with G_t = g_1 + ... + g_t (inclusive,
in-chunk) and D[t, i] = exp(G_t - G_i) for i <= t (taken from the exact pairwise `segsum`,
never as a difference of two large cumsums), the state after token t is

    S_t = exp(G_t) S_0 + sum_{i <= t} D[t, i] k_iᵀ w_i

where the effective writes w_i solve the unit lower-triangular system

    w_t + beta_t sum_{i < t} D[t, i] (k_t · k_i) w_i = beta_t v_t - beta_t exp(G_t) k_t S_0,

i.e. (I + A) W = diag(beta) V - diag(beta exp(G)) K S_0 with A[t, i] = beta_t D[t, i] k_t·k_i
(i < t). Both right-hand-side pieces are solved at once (one triangular solve per chunk,
independent of S_0): U = (I + A)⁻¹ diag(beta) V and Wk = (I + A)⁻¹ diag(beta exp(G)) K, so
W = U - Wk S_0. Then

    o_t   = scale · (exp(G_t) q_t S_0 + sum_{i <= t} D[t, i] (q_t · k_i) w_i)
    S_C   = exp(G_C) S_0 + sum_i D[C, i] k_iᵀ w_i.

Every exponent is a sum of gates (<= 0), so nothing overflows; `-inf` gates are clamped to
`_chunk.LOG_GATE_FLOOR` (a multiplier of ~1e-35, i.e. a reset) so no `inf - inf` appears.

Precision: the chunked form computes in float32 with JAX's default matmul precision, which is
TF32 on H100 (measured 4e-4 relative to the reference for float32 inputs, T=256, K=V=64);
under `jax.default_matmul_precision("highest")` it matches to 2e-7. The reference always runs
at full float32 precision.
"""

import jax
import jax.numpy as jnp

from seqmix.ops import _chunk
from seqmix.ops._impl import resolve

_AVAILABLE = {"reference": True, "chunked": True, "pallas": True}
_AUTO = {"default": "chunked",
         "why": {"gpu": "the gated kernel was checked on the H200, not yet timed"}}
# The ungated delta rule's GPU `auto`, from one H200 run (README "Pallas kernels").
_AUTO_UNGATED = {
    "gpu": "pallas", "default": "chunked",
    "why": {"gpu": "H200 2026-12-04, bf16 B=8 T=4096 H=16 K=V=128, ms fwd / fwd+bwd: pallas "
                   "6.30 / 13.24 vs chunked 8.31 / 21.37, peak 2.53 vs 5.41 GiB"}}

# The oracle's products run at full float32 precision on every backend (GPUs would otherwise
# use TF32 for float32 matmuls).
_HIGHEST = jax.lax.Precision.HIGHEST


def delta_rule(q, k, v, beta, g=None, *, scale=None, initial_state=None, chunk_size: int = 64,
               impl: str = "auto"):
  """(Gated) delta rule over a sequence.

  Args:
    q: queries `[B, T, G, K]` (G divides H; value head j uses q/k head j // (H/G)).
    k: keys `[B, T, G, K]`, expected L2-normalised over K by the caller.
    v: values `[B, T, H, V]`.
    beta: write strengths `[B, T, H]`.
    g: None (DeltaNet) or natural-log decays `[B, T, H]` (<= 0; `-inf` resets the state).
    scale: output scale; default `K ** -0.5`.
    initial_state: float32 `[B, H, K, V]` or None (zeros).
    chunk_size: tokens per chunk of the chunked form (16 to 128 are tested).
    impl: "reference" | "chunked" | "pallas" | "auto".

  Returns:
    (o `[B, T, H, V]` in the dtype of v, final state float32 `[B, H, K, V]`).
  """
  _check(q, k, v, beta, g, initial_state, chunk_size)
  impl = resolve("delta_rule", impl, _AVAILABLE, _AUTO if g is not None else _AUTO_UNGATED)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  h = v.shape[2]
  f32 = lambda x: x.astype(jnp.float32)
  if impl == "pallas":
    return _pallas(q, k, v, beta, g, scale, initial_state)
  q, k = _expand_groups(q, h), _expand_groups(k, h)
  # g = None stays None (no constant zero gates: XLA would constant-fold their [.., C, C]
  # decay matrices at compile time, which takes minutes on GPU at training sizes).
  g = None if g is None else _chunk.clamp_log_gate(f32(g))
  if initial_state is None:
    s0 = jnp.zeros((v.shape[0], h, q.shape[-1], v.shape[-1]), jnp.float32)
  else:
    s0 = f32(initial_state)
  args = (f32(q), f32(k), f32(v), f32(beta), g, scale, s0)
  if impl == "reference":
    o, s = _reference(*args)
  else:
    o, s = _chunked(*args, chunk_size=chunk_size)
  return o.astype(v.dtype), s


def _pallas(q, k, v, beta, g, scale, initial_state):
  """delta_rule through kernels_pallas/delta_rule (q/k heads grouped inside the kernel)."""
  from kernels_pallas.delta_rule import ops as delta_pallas  # kernels load only when asked for
  b, _, h, dv = v.shape
  g = None if g is None else _chunk.clamp_log_gate(g.astype(jnp.float32))
  if initial_state is None:
    s0 = jnp.zeros((b, h, q.shape[-1], dv), jnp.float32)
  else:
    s0 = initial_state.astype(jnp.float32)
  # The chunk_size argument tunes the chunked form; the kernel picks its own (64 tokens).
  o, s = delta_pallas.delta_rule(q, k, v, beta, g, s0, scale=float(scale))
  return o.astype(v.dtype), s


def _check(q, k, v, beta, g, initial_state, chunk_size):
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f"delta_rule: q and k must both be [B, T, G, K]; got {q.shape=} {k.shape=}.")
  b, t, gh, dk = q.shape
  if v.ndim != 4 or v.shape[:2] != (b, t):
    raise ValueError(f"delta_rule: v must be [B, T, H, V] with q's B and T; got {v.shape=}, "
                     f"{q.shape=}.")
  h = v.shape[2]
  if h % gh:
    raise ValueError(f"delta_rule: the {gh} q/k heads must divide the {h} value heads "
                     f"({q.shape=}, {v.shape=}).")
  if beta.shape != (b, t, h):
    raise ValueError(f"delta_rule: beta must be [B, T, H] = {(b, t, h)}; got {beta.shape=}.")
  if g is not None and g.shape != (b, t, h):
    raise ValueError(f"delta_rule: g must be None or [B, T, H] = {(b, t, h)}; got {g.shape=}.")
  if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[3]):
    raise ValueError(f"delta_rule: initial_state must be [B, H, K, V] = "
                     f"{(b, h, dk, v.shape[3])}; got {initial_state.shape=}.")
  if int(chunk_size) < 1:
    raise ValueError(f"delta_rule: chunk_size={chunk_size} must be a positive integer.")


def _expand_groups(x, h):
  """[B, T, G, K] -> [B, T, H, K]: value head j reads q/k head j // (H/G)."""
  return x if x.shape[2] == h else jnp.repeat(x, h // x.shape[2], axis=2)


def _reference(q, k, v, beta, g, scale, s0):
  """Token-by-token float32 scan: the oracle. All inputs float32, q/k already H heads."""

  def step(s, xs):
    q_t, k_t, v_t, b_t, g_t = xs                      # [b, h, k], [b, h, k], [b, h, v], [b, h] x2
    if g_t is not None:
      s = s * jnp.exp(g_t)[..., None, None]
    err = v_t - jnp.einsum("bhk,bhkv->bhv", k_t, s, precision=_HIGHEST)
    s = s + jnp.einsum("bhk,bhv->bhkv", k_t, b_t[..., None] * err, precision=_HIGHEST)
    o_t = scale * jnp.einsum("bhk,bhkv->bhv", q_t, s, precision=_HIGHEST)
    return s, o_t

  xs = [None if x is None else jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, g)]  # [t, b, ...]
  s, o = jax.lax.scan(step, s0, xs)
  return jnp.moveaxis(o, 0, 1), s                            # [b, t, h, v]


def _chunked(q, k, v, beta, g, scale, s0, *, chunk_size):
  """WY/UT chunked form (see the module docstring). Inputs float32, q/k already H heads."""
  t = v.shape[1]
  c = min(int(chunk_size), t)  # a short call (e.g. one decoding step) needs no padding
  # Neutral padding: k = v = beta = 0 writes nothing, g = 0 does not decay the state.
  q, k, v, beta = (_chunk.pad_time(x, c)[0] for x in (q, k, v, beta))
  # [b, n, c, h, d] -> [b, n, h, c, d]; per-token scalars [b, n, c, h] -> [b, n, h, c]
  q, k, v, beta = (jnp.moveaxis(_chunk.to_chunks(x, c), 3, 2) for x in (q, k, v, beta))
  causal = jnp.tril(jnp.ones((c, c), bool))
  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  if g is None:
    decay = causal.astype(jnp.float32)               # D[t, i] = 1 for i <= t  [c, c]
    start = None
  else:
    g = jnp.moveaxis(_chunk.to_chunks(_chunk.pad_time(g, c)[0], c), 3, 2)  # [b, n, h, c]
    seg = _chunk.segsum(g)                           # G_t - G_i, -inf above the diagonal
    decay = jnp.exp(seg)                             # D[t, i]  [b, n, h, c, c]
    start = jnp.exp(jnp.cumsum(g, axis=-1))          # exp(G_t): S_0 decayed to t  [b, n, h, c]
    end = jnp.exp(seg[..., -1, :])                   # exp(G_C - G_i): write i to chunk end

  kk = jnp.einsum("bnhck,bnhsk->bnhcs", k, k)        # [b, n, h, c, c]
  a = jnp.where(strict, beta[..., None] * kk * decay, 0.0)
  beta_k = beta if start is None else beta * start
  rhs = jnp.concatenate([beta[..., None] * v, beta_k[..., None] * k], axis=-1)  # [b,n,h,c,v+k]
  sol = jax.lax.linalg.triangular_solve(a, rhs, left_side=True, lower=True,
                                        unit_diagonal=True)               # (I + A)^-1 rhs
  dv = v.shape[-1]
  u, wk = sol[..., :dv], sol[..., dv:]               # [b, n, h, c, v], [b, n, h, c, k]

  qk = jnp.where(causal, jnp.einsum("bnhck,bnhsk->bnhcs", q, k) * decay, 0.0)  # [b,n,h,c,c]
  if start is None:
    q_dec, k_end, g_end = q, k, None
  else:
    q_dec = q * start[..., None]
    k_end = k * end[..., None]
    g_end = start[..., -1]                           # exp(G_C)  [b, n, h]

  def step(s, xs):
    u_n, wk_n, k_end_n, g_end_n = xs
    w_n = u_n - jnp.einsum("bhck,bhkv->bhcv", wk_n, s)   # effective writes [b, h, c, v]
    kept = s if g_end_n is None else g_end_n[..., None, None] * s
    s_next = kept + jnp.einsum("bhck,bhcv->bhkv", k_end_n, w_n)
    return s_next, (w_n, s)

  xs = [None if x is None else jnp.moveaxis(x, 1, 0) for x in (u, wk, k_end, g_end)]  # [n,b,h,..]
  s, (w, s_prev) = jax.lax.scan(step, s0, xs)
  w, s_prev = jnp.moveaxis(w, 0, 1), jnp.moveaxis(s_prev, 0, 1)  # [b, n, h, c, v], [b,n,h,k,v]
  o = scale * (jnp.einsum("bnhck,bnhkv->bnhcv", q_dec, s_prev)
               + jnp.einsum("bnhcs,bnhsv->bnhcv", qk, w))
  o = _chunk.from_chunks(jnp.moveaxis(o, 2, 3))[:, :t]        # [b, n, c, h, v] -> [b, t, h, v]
  return o, s
