"""TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): a decoder with a KV cache of
at most k tokens, read as a multi-state RNN whose state is the cache; when a token arrives
into a full cache, the cached token (the new one included) with the lowest attention weight
of the current query, averaged over heads, is dropped.

One step, token t with query q_t and the cache C_{t−1} (≤ k tokens of the same document):

    E_t   = C_{t−1} ∪ {t}                                     (k + 1 entries)
    p_t,h = softmax_{j ∈ E_t}(q_t,h · k_j / sqrt(Dh))           (per head h; GQA as MHA)
    o_t,h = Σ_j p_t,h(j) v_j
    C_t   = E_t minus argmin_j mean_h p_t,h(j)                   (when |E_t| > k)

Empty slots and tokens of an earlier document (never visible again: documents are
contiguous) are dropped first. RoPE (or nothing) as MHA, keys cached after rotation at their
own positions. The parallel form is this recurrence run token by token (`lax.scan`): the
evictions depend on every earlier attention, so there is no other exact parallel form, and
decoding (any chunking) equals it. Cost O(T·k) and a sequential scan: a decoding policy, slow
to train with. Shapes: x [B,T,D] -> y [B,T,D].

Not reproduced: the paper applies TOVA to pretrained LLMs (Llama 2, Mistral) at inference.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from seqmix import registry
from seqmix.mixers.attention.mha import MHA


class TOVACache(NamedTuple):
  k: jax.Array       # [B, K, G, Dh] cached keys (RoPE applied)
  v: jax.Array       # [B, K, G, Dh] cached values
  idx: jax.Array     # [B, K] int32 token index of each slot (−1: empty)
  seg: jax.Array     # [B, K] int32 segment id of each slot
  length: jax.Array  # [B] int32 tokens seen so far


@registry.register(
    "tova", paper="Transformers are Multi-State RNNs", year=2024, venue="arXiv",
    family="attention", op="per-step softmax over a fixed cache + argmin eviction (a scan over tokens)",
    parents=("mha",), constant_state=True,
    test_kwargs={"num_heads": 4, "num_kv_heads": 2, "cache_size": 4},
    url="https://arxiv.org/abs/2401.06104")
class TOVA(MHA):
  """TOVA attention (module docstring). MHA's fields (position "rope" or "none"), plus

  cache_size: k >= 1 tokens kept (the current one included in the choice).
  `window`, ALiBi / registered components and `attn_dropout` are refused.
  """
  cache_size: int = 512

  def _check(self):
    if self.cache_size < 1:
      raise ValueError(f"TOVA: cache_size={self.cache_size} must be >= 1.")
    if self.position not in ("rope", "none"):
      raise ValueError(f"TOVA: position={self.position!r}; use 'rope' or 'none'.")
    if self.window is not None or self.attn_dropout:
      raise ValueError(f"TOVA: window={self.window} / attn_dropout={self.attn_dropout} are "
                       "not supported (the cache policy replaces the window); use None / 0.")
    return self._dims()

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> TOVACache:
    """Empty cache of cache_size slots (max_len is not needed: the cache is bounded)."""
    del max_len
    _, g, dh = self._check()
    n = self.cache_size
    return TOVACache(k=jnp.zeros((batch_size, n, g, dh), dtype),
                     v=jnp.zeros((batch_size, n, g, dh), dtype),
                     idx=jnp.full((batch_size, n), -1, jnp.int32),
                     seg=jnp.zeros((batch_size, n), jnp.int32),
                     length=jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], TOVACache | None); arguments as MHA."""
    h, g, dh = self._check()
    b, t, _ = x.shape
    x = x.astype(self.dtype)

    q, k, v = self._project_qkv(x, h, g, dh)   # [b, t, h|g, dh]
    state = self.init_cache(b, 0, jnp.float32) if cache is None else cache
    index = state.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None]   # [b, t]
    positions = index if positions is None else positions.astype(jnp.int32)
    if self.position == "rope":
      q, k = self._rope(q, positions), self._rope(k, positions)
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

    def step(carry, inp):
      ck, cv, cidx, cseg = carry
      qt, kt, vt, it, st = inp               # [b, h, dh], [b, g, dh], [b, g, dh], [b], [b]
      k_all = jnp.concatenate([ck, kt[:, None].astype(ck.dtype)], 1)        # [b, n+1, g, dh]
      v_all = jnp.concatenate([cv, vt[:, None].astype(cv.dtype)], 1)
      idx_all = jnp.concatenate([cidx, it[:, None]], 1)                     # [b, n+1]
      seg_all = jnp.concatenate([cseg, st[:, None]], 1)
      visible = (idx_all >= 0) & (seg_all == st[:, None])                   # [b, n+1]
      kr = jnp.repeat(k_all, h // g, axis=2).astype(jnp.float32)            # [b, n+1, h, dh]
      vr = jnp.repeat(v_all, h // g, axis=2).astype(jnp.float32)
      logits = jnp.einsum("bhd,bjhd->bhj", qt.astype(jnp.float32), kr) * dh ** -0.5
      logits = jnp.where(visible[:, None], logits, -jnp.inf)                # itself: visible
      p = jax.nn.softmax(logits, axis=-1)                                   # [b, h, n+1]
      ot = jnp.einsum("bhj,bjhd->bhd", p, vr)
      score = jnp.where(visible, lax.stop_gradient(p).mean(1), -1.0)        # [b, n+1]
      drop = jnp.argmin(score, axis=1)                                      # [b]
      n = ck.shape[1]
      keep = jnp.arange(n)[None] + (jnp.arange(n)[None] >= drop[:, None])   # [b, n]
      take = lambda a: jnp.take_along_axis(a, keep.reshape(keep.shape + (1,) * (a.ndim - 2)),
                                           axis=1)
      return (take(k_all), take(v_all), take(idx_all), take(seg_all)), ot

    carry = (state.k, state.v, state.idx, state.seg)
    xs = (q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), index.T, seg.T)   # time first
    (ck, cv, cidx, cseg), o = lax.scan(step, carry, xs)
    o = o.swapaxes(0, 1).astype(v.dtype)                                    # [b, t, h, dh]
    new_cache = None if cache is None else TOVACache(
        k=ck.astype(cache.k.dtype), v=cv.astype(cache.v.dtype), idx=cidx, seg=cseg,
        length=cache.length + t)

    # o_proj's bias follows use_bias here (o_bias is not read), as before the helpers moved.
    return self._o_proj(o, deterministic, self.use_bias), new_cache
