"""Embedding-table lookup whose gradient is not a low-precision scatter.

`jnp.take(table.astype(bf16), ids)` differentiates into a bfloat16 scatter-add into the
table. On a GPU that scatter serialises on the rows many tokens share: with a character
vocabulary (65 rows, real text, where a space is ~15 % of the tokens) it took 38 of the
49 ms of a 10.7M-parameter training step on the H200 (trace of
`experiments/bench/loop_bench.py`, 2026-12-04). `lookup` gathers from the table in its own
dtype and accumulates the gradient in float32: as a one-hot matmul for a small vocabulary
(no atomics, deterministic), as a float32 scatter-add otherwise.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

# Vocabularies up to this size take the one-hot matmul backward: N·V·D flops, which at
# V = 1024 is cheaper than the contended scatter it replaces.
ONE_HOT_MAX_VOCAB = 1024

@jax.custom_vjp
def lookup(table, ids):
  """table [V, D], ids [...] int -> [..., D] in table.dtype (out-of-range ids: NaN rows)."""
  return jnp.take(table, ids, axis=0)

def _lookup_fwd(table, ids):
  # The table is a parameter (alive anyway): kept for its shape and dtype.
  return lookup(table, ids), (ids, table)

def _lookup_bwd(res, g):
  ids, table = res
  (v, d), dtype = table.shape, table.dtype
  flat_ids = ids.reshape(-1)  # [N]
  flat_g = g.reshape(-1, d).astype(jnp.float32)  # [N, D]
  if v <= ONE_HOT_MAX_VOCAB:
    # Out-of-range ids give zero rows, as the scatter below drops them.
    one_hot = jax.nn.one_hot(flat_ids, v, dtype=jnp.float32)  # [N, V]
    grad = jnp.einsum("nv,nd->vd", one_hot, flat_g, precision=jax.lax.Precision.HIGHEST)
  else:
    grad = jnp.zeros((v, d), jnp.float32).at[flat_ids].add(flat_g, mode="drop")
  # ids are integers: their cotangent is float0.
  return grad.astype(dtype), jnp.zeros(ids.shape, jax.dtypes.float0)

lookup.defvjp(_lookup_fwd, _lookup_bwd)

class Embed(nn.Embed):
  """`flax.linen.Embed` (same parameter, same `attend`) with `lookup`'s gradient.

  The lookup reads the table in `param_dtype` and casts the rows to `dtype`, so the backward
  accumulates in float32 whatever the compute dtype.
  """

  def __call__(self, inputs):
    """inputs [...] int -> [..., features] in `dtype` (the table's dtype if None)."""
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"Embed: token ids must be integers, got dtype {inputs.dtype}.")
    rows = lookup(self.embedding, inputs)
    return rows.astype(self.dtype or self.embedding.dtype)
