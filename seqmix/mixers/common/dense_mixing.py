"""Dense causal token mixing over a position-indexed table (Synthesizer, AFT-full, gMLP).

These mixers weight token s for token t by an entry of a learned or synthesized table indexed by
the two tokens' positions, `table[pos_t, pos_s]` (L = max_len rows and columns), restricted to
visible pairs: s at or before t in the stream and in the same document. They keep no
constant-size state: decoding keeps every past token's features (`PastCache`, a growing cache as
`mha`'s KV cache: token n goes to slot n) and mixes over [cache slots, new tokens].

    keys, pos_k, visible = with_past(cache, feats, index, positions, seg)
        feats [B,T,...] -> keys [B,S+T,...] (S = 0 without a cache), pos_k [B,S+T],
        visible [B,T,S+T] bool
    table_at(table [..., L, L], pos_q [B,T], pos_k [B,S]) -> [B, ..., T, S]
        NaN where a position is outside [0, L) (a loud result for positions past max_len, which
        inside jit cannot raise)
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PastCache(NamedTuple):
  feats: jax.Array   # [B, S, ...] the mixed features of the tokens seen, cache dtype
  idx: jax.Array     # [B, S] int32 token index held by each slot (−1: empty)
  pos: jax.Array     # [B, S] int32 position of each slot's token (the table's row / column)
  seg: jax.Array     # [B, S] int32 segment id of each slot's token
  length: jax.Array  # [B] int32 tokens seen so far (the next token's index)


def check_max_len(mixer: str, what: str, n: int, max_len: int):
  """ValueError unless n <= max_len (the table has max_len rows)."""
  if n > max_len:
    raise ValueError(f"{mixer}: {what}={n} is longer than max_len={max_len}, the size of its "
                     f"learned [max_len, max_len] token-mixing table; set max_len >= {n}.")


def init_past_cache(batch_size: int, max_len: int, feat_shape, dtype) -> PastCache:
  """An empty cache of max_len slots for features of shape feat_shape."""
  return PastCache(feats=jnp.zeros((batch_size, max_len, *feat_shape), dtype),
                   idx=jnp.full((batch_size, max_len), -1, jnp.int32),
                   pos=jnp.zeros((batch_size, max_len), jnp.int32),
                   seg=jnp.zeros((batch_size, max_len), jnp.int32),
                   length=jnp.zeros((batch_size,), jnp.int32))


def token_index(cache, batch_size: int, t: int, positions=None):
  """(index [B,T] the tokens' places in the stream, positions [B,T] (default: index))."""
  start = jnp.zeros((batch_size,), jnp.int32) if cache is None else cache.length
  index = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  return index, (index if positions is None else positions.astype(jnp.int32))


def segments_or_zeros(segment_ids, batch_size: int, t: int):
  return (jnp.zeros((batch_size, t), jnp.int32) if segment_ids is None
          else segment_ids.astype(jnp.int32))


def with_past(cache, feats, index, positions, seg):
  """Keys = [cache slots, new tokens] and which of them each new token sees.

  feats [B,T,...], index/positions/seg [B,T] -> (keys [B,S+T,...], pos_k [B,S+T],
  visible [B,T,S+T]); S = 0 when cache is None.
  """
  if cache is None:
    keys, idx_k, pos_k, seg_k = feats, index, positions, seg
  else:
    keys = jnp.concatenate([cache.feats.astype(feats.dtype), feats], axis=1)
    idx_k = jnp.concatenate([cache.idx, index], axis=1)
    pos_k = jnp.concatenate([cache.pos, positions], axis=1)
    seg_k = jnp.concatenate([cache.seg, seg], axis=1)
  visible = ((idx_k[:, None, :] >= 0) & (idx_k[:, None, :] <= index[:, :, None])
             & (seg_k[:, None, :] == seg[:, :, None]))
  return keys, pos_k, visible


def write(cache: PastCache, feats, index, positions, seg) -> PastCache:
  """The cache with the T new tokens written to slots `index` (those past its size dropped)."""
  rows = jnp.arange(index.shape[0])[:, None]
  put = lambda buf, new: buf.at[rows, index].set(new.astype(buf.dtype), mode="drop")
  return PastCache(feats=put(cache.feats, feats), idx=put(cache.idx, index),
                   pos=put(cache.pos, positions), seg=put(cache.seg, seg),
                   length=cache.length + index.shape[1])


def table_at(table, pos_q, pos_k):
  """table [..., L, L] at (pos_q [B,T], pos_k [B,S]) -> [B, ..., T, S]; NaN out of range."""
  n = table.shape[-1]
  qi, ki = pos_q[:, :, None], pos_k[:, None, :]                   # [b, t, 1], [b, 1, s]
  inside = (qi >= 0) & (qi < n) & (ki >= 0) & (ki < n)            # [b, t, s]
  got = table[..., jnp.clip(qi, 0, n - 1), jnp.clip(ki, 0, n - 1)]  # [..., b, t, s]
  got = jnp.moveaxis(got, -3, 0) if table.ndim > 2 else got        # [b, ..., t, s]
  inside = inside.reshape(inside.shape[:1] + (1,) * (table.ndim - 2) + inside.shape[1:])
  return jnp.where(inside, got, jnp.nan)


def rows_at(rows, pos_k):
  """Per-token rows [B,T,...,L] at key positions pos_k [B,S] -> [B,...,T,S]; NaN out of range.

  The Dense Synthesizer's synthesized logits: token t's row, read at each key's position.
  """
  n = rows.shape[-1]
  b, t = rows.shape[:2]
  mid = rows.shape[2:-1]
  inside = (pos_k >= 0) & (pos_k < n)                             # [b, s]
  idx = jnp.clip(pos_k, 0, n - 1).reshape((b, 1) + (1,) * len(mid) + pos_k.shape[1:])
  got = jnp.take_along_axis(rows, jnp.broadcast_to(idx, (b, t, *mid, pos_k.shape[1])),
                            axis=-1)                               # [b, t, ..., s]
  got = jnp.moveaxis(got, 1, -2)                                   # [b, ..., t, s]
  inside = inside.reshape((b,) + (1,) * (len(mid) + 1) + pos_k.shape[1:])
  return jnp.where(inside, got, jnp.nan)
