"""Memorizing Transformers (Wu et al., ICLR 2022): local attention within the segment,
plus kNN attention over a non-differentiable memory of earlier (key, value) pairs, mixed by a
learned per-head gate.

Segments are counted in positions, as in `transformer_xl`: token i (position p_i) lies in
segment ⌊p_i / L⌋, which starts at s_i = L ⌊p_i / L⌋. With M_b = memory_size and C = L
(the Transformer-XL cache of the previous segment, `xl_cache=True`) or 0:

    q, k, v = x W_q, x W_k, x W_v                                              [B,T,H,Dh]
    local(i, j)  = doc_j = doc_i,  j <= i,  i − j <= L − 1 + C,  p_j >= s_i − C
    memory(i, j) = doc_j = doc_i,  j <= i,  i − j <= L − 1 + C + M_b,
                   s_i − C − M_b <= p_j < s_i − C
    A_loc_i = Σ_{local j} softmax_j(rope(q_i)·rope(k_j) / √Dh) v_j
    R_i     = the top_k entries j of memory(i, ·) by q_i·k_j (exact, seqmix.ops.retrieval)
    A_mem_i = Σ_{j ∈ R_i} softmax_j(q_i·SG(k_j) / √Dh) SG(v_j)     (0 when memory(i, ·) is empty)
    o_i = sigmoid(b) A_mem_i + (1 − sigmoid(b)) A_loc_i,   y_i = o_i W_o         b [H]

The memory holds keys and values without positions (the paper's kNN memory has none) and is
stop-gradient (the paper does not backpropagate into it). The local context is the current
segment and (xl_cache) the previous one, as the paper's; its T5 relative bias is replaced by
RoPE (a documented simplification). The bank is the M_b tokens before the local context, so
local and kNN attention never see the same token (the paper's
memory is 8k-262k tokens and is searched with an approximate index on TPU; the exact top-k
here holds the [T, L − 1 + C + M_b + T] scores of a call).

A call, with or without a cache, runs over [cache ring; new tokens] (the parallel form from
the empty cache), so the parallel form costs O(T (T + M_b)) scores. The cache
(`MemorizingCache`) is a ring of the last L − 1 + C + M_b tokens' keys (before RoPE), values,
indices, positions and document ids: every key a later query can see.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.ops import attention as attention_op
from seqmix.ops import retrieval
from seqmix.parallel import axes
from seqmix.positional import rope

_MASKED = -1e30  # finite: every query sees itself locally, so no row is all-masked


class MemorizingCache(NamedTuple):
  k: jax.Array       # [B, S, H, Dh] keys before RoPE of the last S = L − 1 + C + M_b tokens
  v: jax.Array       # [B, S, H, Dh] their values
  idx: jax.Array     # [B, S] int32 token index of each slot (−1: empty)
  pos: jax.Array     # [B, S] int32 positions
  seg: jax.Array     # [B, S] int32 document ids
  length: jax.Array  # [B] int32 tokens seen so far


@registry.register(
    "memorizing", paper="Memorizing Transformers", year=2022, venue="ICLR", family="memory",
    op="attention.attention + retrieval.knn_attention", parents=("mha", "transformer_xl"),
    constant_state=True,
    test_kwargs={"num_heads": 2, "segment_len": 4, "memory_size": 6, "top_k": 3},
    url="https://arxiv.org/abs/2203.08913")
class Memorizing(MixerBase):
  """Memorizing Transformer attention.  x [B,T,D] -> y [B,T,D].

  num_heads: H. head_dim: Dh (None: d_model // num_heads).
  segment_len: L (segments counted in positions, ⌊p / L⌋).
  memory_size: M_b, tokens before the segment that the kNN memory holds (>= top_k).
  top_k: entries retrieved per query and head (the paper: 32).
  xl_cache: the local attention also sees the previous segment (C = L; the paper's XL cache).
  rope_base: RoPE base of the local attention.
  use_bias: biases on the projections.
  impl: the local `attention` impl; retrieval_impl: `retrieval.top_k` impl.
  """
  num_heads: int = 4
  head_dim: int | None = None
  segment_len: int = 512
  memory_size: int = 4096
  top_k: int = 32
  xl_cache: bool = True
  rope_base: float = 10000.0
  use_bias: bool = False
  impl: str = "auto"
  retrieval_impl: str = "auto"

  def _dims(self):
    h = self.num_heads
    if h < 1:
      raise ValueError(f"num_heads={h} must be >= 1.")
    if self.head_dim is None:
      check_divisible("d_model", self.d_model, h, "num_heads")
    if not isinstance(self.segment_len, int) or self.segment_len < 1:
      raise ValueError(f"segment_len={self.segment_len!r} must be a positive int.")
    if not isinstance(self.top_k, int) or self.top_k < 1:
      raise ValueError(f"top_k={self.top_k!r} must be a positive int.")
    if not isinstance(self.memory_size, int) or self.memory_size < self.top_k:
      raise ValueError(f"memory_size={self.memory_size!r} must be an int >= top_k="
                       f"{self.top_k} (the bank must hold the entries retrieved); raise it or "
                       f"lower top_k.")
    c = self.segment_len if self.xl_cache else 0
    return h, self.head_dim or self.d_model // h, c, self.segment_len - 1 + c + self.memory_size

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> MemorizingCache:
    """A ring of L − 1 + C + memory_size slots (max_len is not needed)."""
    h, dh, _, s = self._dims()
    z = jnp.zeros((batch_size, s), jnp.int32)
    return MemorizingCache(k=jnp.zeros((batch_size, s, h, dh), dtype),
                           v=jnp.zeros((batch_size, s, h, dh), dtype),
                           idx=jnp.full((batch_size, s), -1, jnp.int32), pos=z, seg=z,
                           length=jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], MemorizingCache | None)."""
    h, dh, c, look = self._dims()
    seg_len, mem_size = self.segment_len, self.memory_size
    b, t, _ = x.shape
    x = x.astype(self.dtype)
    given = cache
    if cache is None:
      cache = self.init_cache(b, t, dtype=self.dtype)

    def dense(name):
      return nn.DenseGeneral((h, dh), use_bias=self.use_bias, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name,
                             kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED,
                                                    axes.HEADS, axes.KV),
                             bias_init=axes.param(nn.initializers.zeros, axes.HEADS, axes.KV))

    q, k, v = dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x)  # [b, t, h, dh]
    gate_b = self.param("gate", axes.param(nn.initializers.zeros, axes.HEADS), (h,),
                        self.param_dtype)

    index = cache.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [b, t]
    pos = index if positions is None else positions.astype(jnp.int32)
    seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    cat = lambda c, n: jnp.concatenate([c.astype(n.dtype), n], axis=1)
    k_ext, v_ext = cat(cache.k, k), cat(cache.v, v)                      # [b, s + t, h, dh]
    ki, kp, ks = (cat(c, n)[:, None] for c, n in ((cache.idx, index), (cache.pos, pos),
                                                  (cache.seg, seg)))      # [b, 1, s + t]
    qi, qp, qs = index[:, :, None], pos[:, :, None], seg[:, :, None]      # [b, t, 1]
    first = (qp // seg_len) * seg_len
    same = (ki >= 0) & (ki <= qi) & (ks == qs)
    local = same & (qi - ki <= seg_len - 1 + c) & (kp >= first - c)      # [b, t, s + t]
    memory = same & (qi - ki <= look) & (kp < first - c) & (kp >= first - c - mem_size)

    bias = jnp.where(local[:, None], 0.0, _MASKED)                        # [b, 1, t, s + t]
    o_loc, _ = attention_op.attention(
        rope.apply_rope(q, pos, base=self.rope_base),
        rope.apply_rope(k_ext, cat(cache.pos, pos), base=self.rope_base), v_ext,
        causal=False, bias=bias, impl=self.impl)
    o_mem, _ = retrieval.knn_attention(q, jax.lax.stop_gradient(k_ext),
                                       jax.lax.stop_gradient(v_ext), k=self.top_k,
                                       valid=memory, impl=self.retrieval_impl)
    g = jax.nn.sigmoid(gate_b.astype(jnp.float32))[:, None]              # [h, 1]
    o = (g * o_mem.astype(jnp.float32) + (1 - g) * o_loc.astype(jnp.float32)).astype(self.dtype)
    y = nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="o_proj",
                        kernel_init=axes.param(nn.initializers.lecun_normal(), axes.HEADS,
                                               axes.KV, axes.EMBED),
                        bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(o)  # [b, t, d]
    if given is None:
      return y, None
    s = cache.k.shape[1]
    keep = min(t, s)
    slots = index[:, t - keep:] % s
    rows = jnp.arange(b)[:, None]
    put = lambda buf, new: buf.at[rows, slots].set(new[:, t - keep:].astype(buf.dtype))
    return y, MemorizingCache(k=put(cache.k, k), v=put(cache.v, v), idx=put(cache.idx, index),
                              pos=put(cache.pos, pos), seg=put(cache.seg, seg),
                              length=cache.length + t)
