"""Document boundaries of packed sequences, turned into the resets the ops understand.

Ops never see segment ids: a mixer turns them into a `-inf` log gate at each document's
first token (gla, rwkv6, delta_rule, mlstm) or `a_t = 0` (linear_scan). Across decoding
calls the cache keeps the last segment id so a boundary between two calls is seen too.
"""

import jax.numpy as jnp

from seqmix.mixers.base import segment_starts  # noqa: F401  (re-exported)


def reset_log_gate(g, starts, shape=None):
  """Log gate with -inf where `starts` [B,T] is True.

  g: None, [B,T,H] or [B,T,H,K] natural-log gate. When g is None, `shape` ([B,T,H]) gives a
  zero gate to put the resets into. starts None -> g unchanged.
  """
  if starts is None:
    return g
  if g is None:
    g = jnp.zeros(shape, jnp.float32)
  s = starts.reshape(starts.shape + (1,) * (g.ndim - 2))
  return jnp.where(s, -jnp.inf, g)


def reset_decay(a, starts):
  """Multiplicative decay `a` [B,T,...] with 0 where `starts` [B,T] is True (linear_scan)."""
  if starts is None:
    return a
  s = starts.reshape(starts.shape + (1,) * (a.ndim - 2))
  return jnp.where(s, jnp.zeros_like(a), a)


def last_segment_id(segment_ids, batch_size):
  """[B] int32: the id of the last token (0 when segment ids are not used)."""
  if segment_ids is None:
    return jnp.zeros((batch_size,), jnp.int32)
  return segment_ids[:, -1].astype(jnp.int32)
