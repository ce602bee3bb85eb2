"""Retrieval from a key-value memory bank on the device: exact top-k over stored keys, and
softmax attention over the retrieved entries (Memorizing Transformers' kNN attention).

Layout: queries q [B, T, H, K]; a memory bank of M entries per row, keys [B, M, H, K] and
values [B, M, H, V], with `valid` [B, M] bool (or [B, T, M] when the visible entries differ
per query, e.g. only earlier segments). Scores are inner products:

    s[b,t,h,m] = scale · q[b,t,h]·keys[b,m,h]   (−inf where not valid)
    top_k: the k largest s per (b, t, h), in descending order -> (scores [B,T,H,k],
           indices [B,T,H,k] int32); slots beyond the number of valid entries get score −inf
           (their index is arbitrary and must not be used)
    knn_attention: o = Σ_{r<k} softmax_r(s_r) values[idx_r],  lse = log Σ_r exp(s_r)

Forms of `top_k` (`impl`):
  reference  all M scores, then `lax.top_k` (exact; ties broken towards the lower index).
  approx     `lax.approx_max_k` with `recall_target` (approximate on TPU, where it is the
             fast path; XLA lowers it to an exact top-k on CPU and GPU). The only
             approximate index: no external library is required, and another index would go
             behind this same signature.
Both hold the [B, T, H, M] scores; a bank too large for that would need a blocked top-k
(merge per-block top-k), not built.

Gradients: `knn_attention` is differentiable in q, the retrieved keys and values (the
selection itself is piecewise constant); a non-differentiable memory, as in the paper, is
the caller's `stop_gradient` on the bank.
"""

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.ops import _impl

_TOPK_IMPLS = {"reference": True, "approx": True}


def _scores(q, keys, valid, scale):
  b, t, h, kd = q.shape
  if keys.ndim != 4 or keys.shape[0] != b or keys.shape[2:] != (h, kd):
    raise ValueError(f"retrieval: keys must be [B, M, H, K] = [{b}, M, {h}, {kd}] to match "
                     f"q {q.shape}; got {keys.shape}.")
  scale = kd ** -0.5 if scale is None else scale
  s = jnp.einsum("bthk,bmhk->bthm", q.astype(jnp.float32), keys.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST) * scale                 # [b, t, h, m]
  if valid is not None:
    if valid.ndim == 2:
      valid = valid[:, None, None, :]
    elif valid.ndim == 3:
      valid = valid[:, :, None, :]
    else:
      raise ValueError(f"retrieval: valid must be [B, M] or [B, T, M]; got {valid.shape}.")
    s = jnp.where(valid, s, -jnp.inf)
  return s


def top_k(q, keys, *, k: int, valid=None, scale=None, recall_target: float = 0.95,
          impl: str = "auto"):
  """The k best-scoring bank entries per query.  q [B,T,H,K], keys [B,M,H,K] ->
  (scores [B,T,H,k] float32 descending, indices [B,T,H,k] int32)."""
  m = keys.shape[1]
  if not isinstance(k, int) or not 1 <= k <= m:
    raise ValueError(f"top_k: k={k!r} must be an int in [1, M={m}] (the bank's entries).")
  impl = _impl.resolve("retrieval.top_k", impl, _TOPK_IMPLS, {"default": "reference"})
  s = _scores(q, keys, valid, scale)
  if impl == "approx":
    vals, idx = lax.approx_max_k(s, k, recall_target=recall_target)
  else:
    vals, idx = lax.top_k(s, k)
  return vals, idx.astype(jnp.int32)


def gather(bank, indices):
  """bank [B, M, H, D], indices [B, T, H, k] -> [B, T, H, k, D]."""
  b, t, h, k = indices.shape
  flat = indices.transpose(0, 2, 1, 3).reshape(b, h, t * k)               # [b, h, t k]
  got = jnp.take_along_axis(bank.transpose(0, 2, 1, 3), flat[..., None], axis=2)
  return got.reshape(b, h, t, k, -1).transpose(0, 2, 1, 3, 4)


def knn_attention(q, keys, values, *, k: int, valid=None, scale=None, impl: str = "auto"):
  """Softmax attention over each query's top-k bank entries.

  q [B,T,H,K], keys [B,M,H,K], values [B,M,H,V] -> (o [B,T,H,V] in values' dtype,
  lse [B,T,H] float32). A query with no valid entry gets o = 0, lse = −inf, zero gradients.
  """
  s, idx = top_k(q, keys, k=k, valid=valid, scale=scale, impl=impl)      # [b, t, h, k]
  # Recompute the selected scores from the gathered keys so gradients reach q and keys.
  sel_k = gather(keys, idx).astype(jnp.float32)                          # [b, t, h, k, K]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  live = jnp.isfinite(s)
  logits = jnp.einsum("bthk,bthrk->bthr", q.astype(jnp.float32), sel_k,
                      precision=lax.Precision.HIGHEST) * scale
  m = lax.stop_gradient(jnp.max(jnp.where(live, logits, -jnp.inf), axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(live, jnp.exp(jnp.where(live, logits - m, 0.0)), 0.0)   # [b, t, h, k]
  den = jnp.sum(p, axis=-1)
  o = jnp.einsum("bthr,bthrv->bthv", p, gather(values, idx).astype(jnp.float32),
                 precision=lax.Precision.HIGHEST)
  safe = jnp.where(den > 0, den, 1.0)
  o = jnp.where((den > 0)[..., None], o / safe[..., None], 0.0)
  lse = jnp.where(den > 0, jnp.log(safe) + m[..., 0], -jnp.inf)
  return o.astype(values.dtype), lse
