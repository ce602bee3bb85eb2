"""Product-key top-k retrieval (Lample et al., "Large Memory Layers with Product Keys",
NeurIPS 2019), shared by the product-key memory (`pkm.py`) and PEER (`peer.py`).

A key of the N = n² slots is a pair of sub-keys (c¹_i, c²_j), slot index i·n + j, and its score
against a query q = [q¹; q²] is s(i, j) = q¹·c¹_i + q²·c²_j. The exact top-k of s over all n²
slots lies inside the k' × k' grid of the top-k' (k' = min(k, n)) of each half, because a pair
outside it is beaten by k pairs inside it; so the search scores 2n sub-keys and k'² candidates
instead of n² keys.
"""

import math

import jax
import jax.numpy as jnp


def n_sub_keys(hidden: int) -> int:
  """Sub-keys per half n = ceil(√hidden), so the slots N = n² are at least `hidden`."""
  if hidden < 1:
    raise ValueError(f"hidden={hidden} must be >= 1 (the number of product-key slots).")
  return math.isqrt(hidden - 1) + 1


def product_key_topk(q, sub_keys, k: int):
  """Exact top-k of the product-key scores, per head.

  q: [..., H, 2, Kh] float, the two query halves of each head.
  sub_keys: [H, 2, n, Kh], each head's two sub-key codebooks.
  k: slots kept per head, 1 <= k <= n².
  Returns (scores [..., H, k] in descending order, indices [..., H, k] int32 in [0, n²)).
  """
  h, two, n, kh = sub_keys.shape
  if two != 2 or q.shape[-3:] != (h, 2, kh):
    raise ValueError(f"product_key_topk: expected q [..., {h}, 2, {kh}] for sub_keys "
                     f"[H, 2, n, Kh] = {sub_keys.shape}; got {q.shape=}.")
  if not 1 <= k <= n * n:
    raise ValueError(f"product_key_topk: k={k} must be in [1, n² = {n * n}].")
  kp = min(k, n)
  s = jnp.einsum("...hck,hcnk->...hcn", q, sub_keys)  # [..., h, 2, n]
  s1, i1 = jax.lax.top_k(s[..., 0, :], kp)  # [..., h, k']
  s2, i2 = jax.lax.top_k(s[..., 1, :], kp)
  cand = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], kp * kp)  # [..., h, k'²]
  scores, flat = jax.lax.top_k(cand, k)  # [..., h, k]
  a = jnp.take_along_axis(i1, flat // kp, axis=-1)
  b = jnp.take_along_axis(i2, flat % kp, axis=-1)
  return scores, (a * n + b).astype(jnp.int32)
