"""Landmark attention's grouped softmax (Mohtashami & Jaggi, NeurIPS 2023), reference form.

Keys are grouped into blocks; every block ends in a landmark key. A query attends to the
keys of its own block as usual, and to an earlier block's other keys only through that
block's landmark, whose score gates the block:

    s_ij = scale · q_i·k_j
    cur(i)     visible keys of the query's block;  gate(i) landmarks of earlier visible blocks
    Z_i  = Σ_{j ∈ cur(i)} e^{s_ij} + Σ_{l ∈ gate(i)} e^{s_il}
    w_ij = e^{s_ij} / Z_i                                            j ∈ cur(i)
    w_ij = (e^{s_{i,l(j)}} / Z_i) · e^{s_ij} / Σ_{j' ∈ blk(j) \\ l} e^{s_ij'}   j in an earlier
                                                                     block, not its landmark
    o_i  = Σ_j w_ij v_j

Arguments: q [B,T,H,K], k [B,S,H,K], v [B,S,H,V]; `cur`, `member`, `gate` [B,T,S] bool masks
(the caller's block structure: member = earlier-block keys that are not landmarks, gate =
their blocks' landmarks) and `block` [B,S] int32, a key's block id (equal ids = one block;
ids in [0, S)). Returns (o [B,T,H,V] in v's dtype, None). O(T·S) memory: the reference only
(no chunked or kernel form yet).
"""

import jax
import jax.numpy as jnp
from jax import lax


def _per_block(fn, x, block, s):
  """fn-reduce x [B,T,H,S] over keys of equal `block` [B,S] -> [B,T,H,S] (value of j's block)."""
  def row(xr, br):                                            # xr [T, H, S], br [S]
    red = fn(jnp.moveaxis(xr, -1, 0), br, num_segments=s)     # [S_blocks, T, H]
    return jnp.moveaxis(red[br], 0, -1)                       # [T, H, S]
  return jax.vmap(row)(x, block)


def grouped_softmax_attention(q, k, v, *, cur, member, gate, block, scale=None):
  """Landmark attention (the module docstring's w_ij).  -> (o [B,T,H,V], None)."""
  s_keys = k.shape[1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  s = jnp.einsum("bthk,bshk->bths", q.astype(jnp.float32), k.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST) * scale                      # [b, t, h, s]
  cur, member, gate = (m[:, :, None, :] for m in (cur, member, gate))           # [b, t, 1, s]
  neg = jnp.float32(-jnp.inf)
  top = jnp.where(cur | gate, s, neg)
  m = lax.stop_gradient(jnp.max(top, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e_top = jnp.where(cur | gate, jnp.exp(jnp.where(cur | gate, s - m, 0.0)), 0.0)
  z = jnp.sum(e_top, axis=-1, keepdims=True)                                   # [b, t, h, 1]
  # Within-block softmax over members, shifted by the block's own max (no 0/0 underflow).
  sm = jnp.where(member, s, neg)
  bmax = lax.stop_gradient(_per_block(jax.ops.segment_max, sm, block, s_keys))
  bmax = jnp.where(jnp.isfinite(bmax), bmax, 0.0)
  e_mem = jnp.where(member, jnp.exp(jnp.where(member, s - bmax, 0.0)), 0.0)
  den = _per_block(jax.ops.segment_sum, e_mem, block, s_keys)
  g = _per_block(jax.ops.segment_sum, jnp.where(gate, e_top, 0.0), block, s_keys)
  safe_z = jnp.where(z > 0, z, 1.0)
  w = (jnp.where(cur, e_top, 0.0)
       + jnp.where(member, g * e_mem / jnp.where(den > 0, den, 1.0), 0.0)) / safe_z
  o = jnp.einsum("bths,bshv->bthv", w, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
  return o.astype(v.dtype), None
