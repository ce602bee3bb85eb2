"""The mLSTM of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory").

Per head, a matrix memory `C [K, V]`, a normaliser `n [K]` and a max-stabiliser `m` (scalar).
The gates arrive as pre-activations `[B, T, H]`: the input gate is exponential (log input gate
`ĩ_t` itself), the forget gate is a sigmoid taken in log space (`log f_t = logsigmoid(f̃_t)`).
With the state stored divided by `exp(m)` (the true, unstabilised memory is `exp(m_t) C_t`):

    lf_t = logsigmoid(f̃_t)            li_t = ĩ_t
    m_t  = max(lf_t + m_{t-1}, li_t)
    C_t  = exp(lf_t + m_{t-1} - m_t) C_{t-1} + exp(li_t - m_t) k_tᵀ v_t
    n_t  = exp(lf_t + m_{t-1} - m_t) n_{t-1} + exp(li_t - m_t) k_t
    h_t  = (scale q_t) C_t / (max(|(scale q_t) · n_t|, exp(-m_t)) + eps)

This is the paper's `h̃_t = C̃_t q_t / max(|ñ_tᵀ q_t|, 1)` (its mLSTM equations with the
stabiliser of its appendix), written in the convention of the NX-AI reference kernels
(`mlstm_kernels`): the `1/sqrt(K)` scale multiplies q (the paper's original code scales k
instead; q·(s k) = (s q)·k, so outputs agree, only the stored C and n differ by that factor),
`eps = 1e-6` is added to the denominator, and the default initial stabiliser is `m_0 = 0`.
Multiplying numerator and denominator by `exp(m_t)` shows that `m` cancels from `h_t` up to the
`eps` term (`h_t = q C̃_t / (max(|q ñ_t|, 1) + eps exp(m_t))`): with `eps = 0` the output is
exactly invariant to the stabiliser, e.g. to replacing an initial state `(C, n, m)` by
`(C e^{-δ}, n e^{-δ}, m + δ)`.

Reset semantics: `f̃ = -inf` (forget gate 0) clears the memory; `ĩ = -inf` writes nothing. Both
are clamped at `_chunk.LOG_GATE_FLOOR` (-80: a multiplier of ~1e-35) so no `inf - inf` or NaN
appears, in outputs or gradients; `m_t >= -80` then keeps `exp(-m_t) <= e^80` finite.

Forms (`impl`):
  reference  token-by-token float32 `lax.scan` of the recurrence above: the oracle.
  chunked    chunkwise-parallel form. Inside a chunk starting from the stabilised state
             (C_0, n_0, m_0), with b_t = lf_1 + ... + lf_t (in-chunk, inclusive) and
             a[t, s] = lf_{s+1} + ... + lf_t (the exact pairwise `segsum`):
               m_t = max(b_t + m_0, max_{s<=t} a[t, s] + li_s)
               D[t, s] = e^{a[t,s] + li_s - m_t} (scale q_t·k_s)      (s <= t)
               num_t = e^{b_t+m_0-m_t} (scale q_t) C_0 + sum_{s<=t} D[t, s] v_s
               den_t = e^{b_t+m_0-m_t} (scale q_t) n_0 + sum_{s<=t} D[t, s]
               h_t = num_t / (max(|den_t|, e^{-m_t}) + eps)
             and the chunk-end state uses the same expressions at t = C. This `m_t` is the
             reference's `m_t` unrolled, so both forms hold the SAME (C, n, m) at every chunk
             boundary (up to rounding), and the same per-token stabiliser. Every exponent is
             <= 0: no `exp(+cumsum)` is ever formed. A `lax.scan` carries the state across chunks.
  pallas     not built.
"""

import jax
import jax.numpy as jnp

from seqmix.ops import _chunk
from seqmix.ops._impl import resolve

_AVAILABLE = {"reference": True, "chunked": True, "pallas": False}
_AUTO = {"default": "chunked"}

# Full float32 products on every backend (GPUs would otherwise use TF32 for float32 matmuls).
_HIGHEST = jax.lax.Precision.HIGHEST


def mlstm(q, k, v, i, f, *, scale=None, eps: float = 1e-6, initial_state=None,
          chunk_size: int = 64, impl: str = "auto"):
  """mLSTM (matrix LSTM with exponential input gate and stabiliser) over a sequence.

  Args:
    q: queries `[B, T, H, K]`.
    k: keys `[B, T, H, K]`.
    v: values `[B, T, H, V]`.
    i: input-gate PRE-activations `[B, T, H]` (the log of the exponential input gate).
    f: forget-gate PRE-activations `[B, T, H]` (the op takes `logsigmoid(f)`; `-inf` resets).
    scale: multiplies q; default `K ** -0.5`.
    eps: added to the output denominator (1e-6 as in the NX-AI kernels; 0 makes the output
      exactly invariant to the stabiliser).
    initial_state: None (C = 0, n = 0, m = 0) or the tuple `(C [B, H, K, V], n [B, H, K],
      m [B, H])`, float32, in the stabilised representation described in the module docstring.
    chunk_size: tokens per chunk of the chunked form (16 to 128 are tested).
    impl: "reference" | "chunked" | "pallas" (not built) | "auto".

  Returns:
    (h `[B, T, H, V]` in the dtype of v, (C `[B, H, K, V]`, n `[B, H, K]`, m `[B, H]`) float32).
  """
  _check(q, k, v, i, f, initial_state, chunk_size)
  impl = resolve("mlstm", impl, _AVAILABLE, _AUTO)
  bsz, _, h, dk = q.shape
  dv = v.shape[-1]
  if scale is None:
    scale = dk ** -0.5
  if initial_state is None:
    initial_state = (jnp.zeros((bsz, h, dk, dv), jnp.float32),
                     jnp.zeros((bsz, h, dk), jnp.float32), jnp.zeros((bsz, h), jnp.float32))
  state = tuple(x.astype(jnp.float32) for x in initial_state)
  f32 = lambda x: x.astype(jnp.float32)
  floor = _chunk.LOG_GATE_FLOOR
  # Clamp the pre-activations themselves: logsigmoid(-80) = -80 to float32 precision, and a
  # clamped -inf gives finite values and zero (not NaN) gradients.
  lf = jax.nn.log_sigmoid(jnp.maximum(f32(f), floor))
  li = jnp.maximum(f32(i), floor)
  qs = f32(q) * scale
  if impl == "reference":
    out, state = _reference(qs, f32(k), f32(v), li, lf, state, eps)
  else:
    out, state = _chunked(qs, f32(k), f32(v), li, lf, state, eps, chunk_size)
  return out.astype(v.dtype), state


def _check(q, k, v, i, f, initial_state, chunk_size):
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f"mlstm: q and k must both be [B, T, H, K]; got {q.shape=} {k.shape=}.")
  if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"mlstm: v must be [B, T, H, V] with B, T, H of q; got {v.shape=}, "
                     f"{q.shape=}.")
  for name, g in (("i", i), ("f", f)):
    if g.shape != q.shape[:3]:
      raise ValueError(f"mlstm: gate {name} must be [B, T, H] = {q.shape[:3]}; got {g.shape}.")
  if initial_state is not None:
    b, _, h, dk = q.shape
    want = ((b, h, dk, v.shape[-1]), (b, h, dk), (b, h))
    got = tuple(getattr(x, "shape", None) for x in initial_state)
    if len(initial_state) != 3 or got != want:
      raise ValueError(f"mlstm: initial_state must be (C, n, m) with shapes {want}; got {got}.")
  if chunk_size < 1:
    raise ValueError(f"mlstm: chunk_size must be positive; got {chunk_size}.")


def _reference(q, k, v, li, lf, state, eps):
  """Token-by-token stabilised recurrence (float32)."""

  def step(carry, xs):
    c, n, m = carry                                   # [b, h, k, v], [b, h, k], [b, h]
    q_t, k_t, v_t, li_t, lf_t = xs                    # [b, h, k], [b, h, k], [b, h, v], [b, h]
    m_new = jnp.maximum(lf_t + m, li_t)
    decay = jnp.exp(lf_t + m - m_new)
    write = jnp.exp(li_t - m_new)
    c = decay[..., None, None] * c + write[..., None, None] * jnp.einsum(
        "bhk,bhv->bhkv", k_t, v_t, precision=_HIGHEST)
    n = decay[..., None] * n + write[..., None] * k_t
    num = jnp.einsum("bhk,bhkv->bhv", q_t, c, precision=_HIGHEST)
    den = jnp.einsum("bhk,bhk->bh", q_t, n, precision=_HIGHEST)
    den = jnp.maximum(jnp.abs(den), jnp.exp(-m_new)) + eps
    return (c, n, m_new), num / den[..., None]

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, li, lf))   # [t, b, h, ...]
  state, out = jax.lax.scan(step, state, xs)
  return jnp.moveaxis(out, 0, 1), state                          # [b, t, h, v]


def _chunked(q, k, v, li, lf, state, eps, chunk):
  """Chunkwise-parallel form (see the module docstring)."""
  # Neutral padding: zero q/k/v, forget gate 1 (lf = 0) and no write (li = -inf, so m is
  # unchanged and the final state is the one after the last real token).
  q, t = _chunk.pad_time(q, chunk)
  k, _ = _chunk.pad_time(k, chunk)
  v, _ = _chunk.pad_time(v, chunk)
  lf, _ = _chunk.pad_time(lf, chunk)
  li, _ = _chunk.pad_time(li, chunk, value=-jnp.inf)
  # [b, t, h, d] -> [b, n, c, h, d] -> [n, b, h, c, d]: the scan runs over chunks n.
  tr = lambda x: jnp.moveaxis(jnp.moveaxis(_chunk.to_chunks(x, chunk), 3, 2), 1, 0)
  qc, kc, vc, lic, lfc = (tr(x) for x in (q, k, v, li, lf))

  a = _chunk.segsum(lfc)                            # [n, b, h, c, c]: a[t, s] = lf_{s+1..t}
  b = jnp.cumsum(lfc, axis=-1)                      # [n, b, h, c]: lf_{1..t}, in-chunk
  log_d = a + lic[..., None, :]                     # [n, b, h, c(t), c(s)]
  m_intra = jnp.max(log_d, axis=-1)                 # [n, b, h, c]
  log_end = log_d[..., -1, :]                       # [n, b, h, c]: write s seen at chunk end
  m_end_intra = m_intra[..., -1]                    # [n, b, h]
  b_end = b[..., -1]                                # [n, b, h]
  # Chunk-end writes, stabilised by their own max: kᵀ v and k summed with e^{log_end - max}.
  w_end = jnp.exp(log_end - m_end_intra[..., None])                          # [n, b, h, c]
  kv_end = jnp.einsum("nbhc,nbhck,nbhcv->nbhkv", w_end, kc, vc, precision=_HIGHEST)
  k_end = jnp.einsum("nbhc,nbhck->nbhk", w_end, kc, precision=_HIGHEST)

  def inter(carry, xs):
    c0, n0, m0 = carry
    kv_j, k_j, m_w, b_j = xs
    m1 = jnp.maximum(b_j + m0, m_w)
    decay = jnp.exp(b_j + m0 - m1)
    write = jnp.exp(m_w - m1)
    c1 = decay[..., None, None] * c0 + write[..., None, None] * kv_j
    n1 = decay[..., None] * n0 + write[..., None] * k_j
    return (c1, n1, m1), (c0, n0, m0)

  state, (c0, n0, m0) = jax.lax.scan(inter, state, (kv_end, k_end, m_end_intra, b_end))
  # c0 [n, b, h, k, v], n0 [n, b, h, k], m0 [n, b, h]: the state entering each chunk.
  m_inter = b + m0[..., None]                                                # [n, b, h, c]
  m_tok = jnp.maximum(m_inter, m_intra)                                      # [n, b, h, c]
  d = jnp.exp(log_d - m_tok[..., None])                                      # [n, b, h, c, c]
  s = jnp.einsum("nbhtk,nbhsk->nbhts", qc, kc, precision=_HIGHEST) * d
  w_inter = jnp.exp(m_inter - m_tok)                                         # [n, b, h, c]
  num = (w_inter[..., None] * jnp.einsum("nbhtk,nbhkv->nbhtv", qc, c0, precision=_HIGHEST)
         + jnp.einsum("nbhts,nbhsv->nbhtv", s, vc, precision=_HIGHEST))
  den = (w_inter * jnp.einsum("nbhtk,nbhk->nbht", qc, n0, precision=_HIGHEST)
         + jnp.sum(s, axis=-1))
  den = jnp.maximum(jnp.abs(den), jnp.exp(-m_tok)) + eps
  out = num / den[..., None]                                                 # [n, b, h, c, v]
  out = _chunk.from_chunks(jnp.moveaxis(jnp.moveaxis(out, 0, 1), 3, 2))      # [b, t, h, v]
  return out[:, :t], state
