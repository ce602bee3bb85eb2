"""Attention with remapped RoPE positions, merged over disjoint key sets (the building block of
Self-Extend, Dual Chunk Attention, StreamingLLM and LM-Infinite; not registered itself).

A subclass names, for query positions p_q [B,T] and key positions p_k [B,S]:
  `key_positions(p)`   the positions the keys are rotated at, one per key "version" (V ≥ 1);
  `parts(p_q, p_k)`    a list of (query positions, key version, mask [B,T,S]) whose masks
                       are disjoint subsets of the causal, same-document keys of each query
                       (keys in no part are not seen; every query's own key is in a part).
Each part is an attention over its keys with RoPE at the remapped positions,

    o_p, lse_p = blockwise_attention(rope(q, qpos_p), rope(k, kpos_{v_p}), v | causal, mask_p)

and the parts merge exactly by log-sum-exp (`merge_partials`), which equals one softmax over
all visible keys whose logit for key j is the one of the part j falls in. Masks by positions
(documents restart them), causality and documents by token index and segment ids, as MHA.

Decoding keeps `RemappedCache`: each key rotated at every version's position, the values, and
each slot's token index, position and segment id (by default token n -> slot n: size the cache
for the whole stream; `SinkWindowAttention` keeps a bounded cache of sinks + a ring). The
masks are dense [B,T,S] additive biases: this is the plain form (the papers' kernels slice
keys by chunk / window instead; not built here).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.mixers.attention.mha import MHA
from seqmix.ops import attention as attention_op

# Finite mask value: every query sees at least itself in one part, so a masked logit's
# exp(mask − max) is exactly 0 and a part that sees no key gets merge weight exactly 0.
_MASKED = -1e30


class RemappedCache(NamedTuple):
  k: jax.Array       # [B, S, V, G, Dh] keys, RoPE at each of the V key-position versions
  v: jax.Array       # [B, S, G, Dh] values
  idx: jax.Array     # [B, S] int32 token index of each slot (−1: empty)
  pos: jax.Array     # [B, S] int32 position of each slot's token
  seg: jax.Array     # [B, S] int32 segment id of each slot's token
  length: jax.Array  # [B] int32 tokens seen so far


class RemappedAttention(MHA):
  """MHA's projections, heads and RoPE options with remapped positions (module docstring).

  `window`, `position` other than "rope" and `attn_dropout` are refused (the remapping is
  the point; a window would cut the far keys the remapping exists for).
  """

  def key_positions(self, pos):
    raise NotImplementedError

  def parts(self, q_pos, k_pos):
    raise NotImplementedError

  def cache_size(self, max_len: int) -> int:
    """Slots of the decoding cache (default: max_len, token n -> slot n)."""
    return max_len

  def cache_slots(self, index, positions, size: int):
    """Slot of each new token [B,T] (>= size: not kept). Default: its token index."""
    del positions, size
    return index

  def _check(self):
    name = type(self).__name__
    if self.position != "rope":
      raise ValueError(f"{name}: position={self.position!r}; it remaps RoPE positions, so "
                       "position must be 'rope'.")
    if self.window is not None:
      raise ValueError(f"{name}: window={self.window} is not supported; use None.")
    if self.attn_dropout:
      raise ValueError(f"{name}: attn_dropout={self.attn_dropout} is not supported; use 0.")
    return self._dims()

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> RemappedCache:
    """Empty cache of `cache_size(max_len)` slots, V key versions."""
    _, g, dh = self._check()
    n_ver = len(self.key_positions(jnp.zeros((1, 1), jnp.int32)))
    max_len = self.cache_size(max_len)
    return RemappedCache(k=jnp.zeros((batch_size, max_len, n_ver, g, dh), dtype),
                         v=jnp.zeros((batch_size, max_len, g, dh), dtype),
                         idx=jnp.full((batch_size, max_len), -1, jnp.int32),
                         pos=jnp.zeros((batch_size, max_len), jnp.int32),
                         seg=jnp.zeros((batch_size, max_len), jnp.int32),
                         length=jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], RemappedCache | None); arguments as MHA."""
    h, g, dh = self._check()
    b, t, _ = x.shape
    x = x.astype(self.dtype)

    q, k, v = self._project_qkv(x, h, g, dh)   # [b, t, h|g, dh]

    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
    index = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]     # [b, t]
    positions = index if positions is None else positions.astype(jnp.int32)
    rot = self._rope
    k_ver = jnp.stack([rot(k, p) for p in self.key_positions(positions)], axis=2)
    # [b, t, V, g, dh]

    if cache is None:
      k_all, v_all, pos_all, seg, visible, new_cache = k_ver, v, positions, segment_ids, None, None
    else:
      seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
             else segment_ids.astype(jnp.int32))
      k_all = jnp.concatenate([cache.k.astype(k_ver.dtype), k_ver], axis=1)   # [b, s+t, V, g, dh]
      v_all = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
      idx_all = jnp.concatenate([cache.idx, index], axis=1)                 # [b, s + t]
      pos_all = jnp.concatenate([cache.pos, positions], axis=1)
      seg_all = jnp.concatenate([cache.seg, seg], axis=1)
      k_idx, q_idx = idx_all[:, None, :], index[:, :, None]
      visible = (k_idx >= 0) & (k_idx <= q_idx) & (seg_all[:, None, :] == seg[:, :, None])
      slots = self.cache_slots(index, positions, cache.k.shape[1])          # [b, t]
      rows = jnp.arange(b)[:, None]
      put = lambda buf, new: buf.at[rows, slots].set(new.astype(buf.dtype), mode="drop")
      new_cache = RemappedCache(k=put(cache.k, k_ver), v=put(cache.v, v),
                                idx=put(cache.idx, index), pos=put(cache.pos, positions),
                                seg=put(cache.seg, seg), length=cache.length + t)

    o = lse = None
    for q_pos, ver, mask in self.parts(positions, pos_all):    # mask [b, t, s]
      if visible is not None:
        mask = mask & visible
      bias = jnp.where(mask, 0.0, jnp.float32(_MASKED))[:, None]   # [b, 1, t, s]
      o_p, lse_p = attention_op.blockwise_attention(
          rot(q, q_pos), k_all[:, :, ver], v_all, causal=cache is None,
          segment_ids=seg if cache is None else None, bias=bias, impl=self.impl)
      o, lse = (o_p, lse_p) if o is None else attention_op.merge_partials(o, lse, o_p, lse_p)

    # o_proj's bias follows use_bias here (o_bias is not read), as before the helpers moved.
    return self._o_proj(o, deterministic, self.use_bias), new_cache


class SinkWindowAttention(RemappedAttention):
  """Remapped attention that sees only "sink" keys (positions < `num_sinks()`) and the last
  `recent()` tokens, so decoding keeps a bounded cache (StreamingLLM, LM-Infinite).

  Cache of S + W slots: the token at position p < S goes to sink slot p (a later document's
  p-th token replaces it; the earlier document is never read again, documents being
  contiguous in the stream); any other token n to ring slot S + (n mod W), which holds the
  last W tokens (sinks leave holes). Subclasses' `parts` must make every non-sink key at
  distance >= W invisible.
  """

  def num_sinks(self) -> int:
    raise NotImplementedError

  def recent(self) -> int:
    raise NotImplementedError

  def cache_size(self, max_len: int) -> int:
    return self.num_sinks() + self.recent()

  def cache_slots(self, index, positions, size: int):
    s, w = self.num_sinks(), self.recent()
    t = index.shape[1]
    later = jnp.arange(t)[None, :, None] < jnp.arange(t)[None, None, :]              # [1, t, t]
    repeated = jnp.any(later & (positions[:, :, None] == positions[:, None, :]), -1)  # [b, t]
    sink_slot = jnp.where(repeated, size, positions)        # only the last of a position stays
    recent = index > index[:, -1:] - w                      # the chunk's last w tokens
    ring_slot = jnp.where(recent, s + index % w, size)
    return jnp.where(positions < s, sink_slot, ring_slot)
