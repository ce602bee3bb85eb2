"""Transformer-XL attention (Dai et al., ACL 2019): segment-level recurrence over a
stop-gradient memory of the previous tokens' hidden states, with the paper's relative
position encoding (sinusoid R, projection W_R, global biases u and v).

Segments are counted in positions: token i (absolute position p_i, the caller's, restarting
at 0 in every packed document) lies in segment ⌊p_i / L⌋, which starts at s_i = L ⌊p_i / L⌋.
Its memory is the M tokens before that start; it attends to [memory; its segment up to itself]:

    visible(i, j) = doc_j = doc_i  and  j <= i  and  i − j <= L − 1 + M  and  p_j >= s_i − M
    h̃_j         = stop_gradient(x_j) if p_j < s_i (memory) else x_j          x [B,T,D]
    q_i = x_i W_q,  k_j = h̃_j W_k,  v_j = h̃_j W_v                          [H, Dh] per token
    r_d = W_R R_d,  R_d = [sin(d ω), cos(d ω)],  ω_m = 10000^(−2m/D)        (d = p_i − p_j)
    a_ij = ((q_i + u)·k_j + (q_i + v)·r_{p_i − p_j}) / √Dh                  u, v [H, Dh]
    o_i = Σ_{visible j} softmax_j(a_ij) v_j,   y_i = o_i W_o

The four terms of the paper's eq. (content, content-position, global content bias u, global
position bias v) are (q+u)·k and (q+v)·r. The paper's memory is the previous *segment's*
hidden states of this layer (M = L in training, longer at evaluation); here it is the M
tokens before the segment, for any M >= 0 (M = 0: attention within segments only). The
`i − j <= L − 1 + M` clause is implied when positions advance by one per token (every
visible key then has p_i − p_j <= L − 1 + M); it is part of the definition so the parallel
form and the bounded decoding cache agree for any positions.

Parallel form: the T queries are cut into blocks of L tokens by index (T padded to a
multiple of L at the end, which cannot reach earlier tokens); block n reads the
L − 1 + M + L keys before and in it, each key twice (live and stop-gradient), with the
visibility and memory masks and the relative term as an additive bias of
`seqmix.ops.attention.attention`.

Decoding keeps `TransformerXLCache`: a ring of the last L − 1 + M layer inputs (the memory
is hidden states, as in the paper, so keys and values are recomputed from them with the
current weights), with each slot's token index, position and document id. Everything read
from the cache is stop-gradient: a call's gradients reach its own tokens only, which is the
paper's training scheme when calls are whole segments (`seqmix.models.segment_recurrent`
with segment_len = L).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.ops import attention as attention_op
from seqmix.parallel import axes

_MASKED = -1e30  # finite: every query sees itself, so no row is all-masked


class TransformerXLCache(NamedTuple):
  x: jax.Array       # [B, S, D] layer inputs of the last S = L − 1 + M tokens (ring), cache dtype
  idx: jax.Array     # [B, S] int32 token index held by each slot (−1: empty)
  pos: jax.Array     # [B, S] int32 position of each slot's token
  seg: jax.Array     # [B, S] int32 document id of each slot's token
  length: jax.Array  # [B] int32 tokens seen so far (the next token's index)


def relative_sinusoid(distances, d_model: int):
  """R_d = [sin(d ω), cos(d ω)], ω_m = 10000^(−2m/D):  distances [P] -> [P, D] float32."""
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, d_model, 2, dtype=np.float64) / d_model))
  ang = jnp.asarray(distances, jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)[:, :d_model]


@registry.register(
    "transformer_xl", paper="Transformer-XL: Attentive Language Models Beyond a Fixed-Length "
    "Context", year=2019, venue="ACL", family="memory", op="attention.attention",
    parents=("mha",), constant_state=True,
    test_kwargs={"num_heads": 2, "segment_len": 4, "mem_len": 3},
    url="https://arxiv.org/abs/1901.02860")
class TransformerXL(MixerBase):
  """Transformer-XL attention.  x [B,T,D] -> y [B,T,D].

  num_heads: H. head_dim: Dh (None: d_model // num_heads).
  segment_len: L, tokens per segment (segments are counted in positions: ⌊p / L⌋).
  mem_len: M >= 0, memory tokens before each segment (the paper: M = L in training).
  use_bias: biases on the q/k/v/output projections.
  impl: `seqmix.ops.attention.attention` impl (it must take an additive bias).
  """
  num_heads: int = 4
  head_dim: int | None = None
  segment_len: int = 128
  mem_len: int = 128
  use_bias: bool = False
  impl: str = "auto"

  def _dims(self):
    """(H, Dh, L, M, P = L − 1 + M), after checking the configuration."""
    h = self.num_heads
    if h < 1:
      raise ValueError(f"num_heads={h} must be >= 1.")
    if self.head_dim is None:
      check_divisible("d_model", self.d_model, h, "num_heads")
    if not isinstance(self.segment_len, int) or self.segment_len < 1:
      raise ValueError(f"segment_len={self.segment_len!r} must be a positive int (tokens per "
                       "segment).")
    if not isinstance(self.mem_len, int) or self.mem_len < 0:
      raise ValueError(f"mem_len={self.mem_len!r} must be an int >= 0 (memory tokens before "
                       "each segment; 0 attends within segments only).")
    dh = self.head_dim or self.d_model // h
    return h, dh, self.segment_len, self.mem_len, self.segment_len - 1 + self.mem_len

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> TransformerXLCache:
    """A ring of max(L − 1 + M, 1) slots (max_len is not needed: the memory is bounded)."""
    s = max(self._dims()[4], 1)
    return TransformerXLCache(x=jnp.zeros((batch_size, s, self.d_model), dtype),
                              idx=jnp.full((batch_size, s), -1, jnp.int32),
                              pos=jnp.zeros((batch_size, s), jnp.int32),
                              seg=jnp.zeros((batch_size, s), jnp.int32),
                              length=jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], TransformerXLCache | None).

    positions [B,T]: default arange(T) (plus the cache length when decoding); they decide
    the segments and the relative distances. segment_ids [B,T]: packed documents.
    """
    h, dh, seg_len, mem_len, look = self._dims()
    b, t, d = x.shape
    x = x.astype(self.dtype)

    def dense(heads, name, use_bias=self.use_bias):
      return nn.DenseGeneral((heads, dh), use_bias=use_bias, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name,
                             kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED,
                                                    axes.HEADS, axes.KV),
                             bias_init=axes.param(nn.initializers.zeros, axes.HEADS, axes.KV))

    q_proj, k_proj, v_proj = dense(h, "q_proj"), dense(h, "k_proj"), dense(h, "v_proj")
    r_proj = dense(h, "r_proj", use_bias=False)
    bias_init = axes.param(nn.initializers.zeros, axes.HEADS, axes.KV)
    u = self.param("u", bias_init, (h, dh), self.param_dtype)      # global content bias
    vb = self.param("v", bias_init, (h, dh), self.param_dtype)     # global position bias
    r = r_proj(relative_sinusoid(np.arange(look + 1), d).astype(self.dtype))  # [P + 1, h, dh]

    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
    index = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]     # [b, t]
    positions = index if positions is None else positions.astype(jnp.int32)
    seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))

    def attend(xq, xk, q_meta, k_meta):
      """Queries xq [b', tq, d] over keys xk [b', s, d] (both halves of each key)."""
      q = q_proj(xq)                                                 # [b', tq, h, dh]
      k_live, v_live = k_proj(xk), v_proj(xk)                        # [b', s, h, dh]
      xk_sg = jax.lax.stop_gradient(xk)
      k_mem, v_mem = k_proj(xk_sg), v_proj(xk_sg)
      (qi, qp, qs), (ki, kp, ks) = q_meta, k_meta
      qi, qp, qs = qi[:, :, None], qp[:, :, None], qs[:, :, None]    # [b', tq, 1]
      ki, kp, ks = ki[:, None], kp[:, None], ks[:, None]             # [b', 1, s]
      first = (qp // seg_len) * seg_len                              # segment start s_i
      visible = ((ki >= 0) & (ki <= qi) & (qi - ki <= look) & (ks == qs)
                 & (kp >= first - mem_len))                          # [b', tq, s]
      in_memory = kp < first
      dist = jnp.clip(qp - kp, 0, look)                              # [b', tq, s]
      scale = dh ** -0.5
      bd = jnp.einsum("bthd,phd->bhtp", (q + vb).astype(jnp.float32),
                      r.astype(jnp.float32))                         # [b', h, tq, P + 1]
      bd = jnp.take_along_axis(bd, jnp.broadcast_to(dist[:, None], bd.shape[:3] + dist.shape[-1:]),
                               axis=-1) * scale                      # [b', h, tq, s]
      mask = lambda m: jnp.where(m[:, None], 0.0, _MASKED)
      bias = jnp.concatenate([bd + mask(visible & in_memory), bd + mask(visible & ~in_memory)],
                             axis=-1)                                # [b', h, tq, 2s]
      o, _ = attention_op.attention(
          q + u.astype(q.dtype), jnp.concatenate([k_mem, k_live], axis=1),
          jnp.concatenate([v_mem, v_live], axis=1), causal=False, scale=scale, bias=bias,
          impl=self.impl)
      return o                                                       # [b', tq, h, dh]

    if cache is None:
      o = self._parallel(attend, x, index, positions, seg, seg_len, look)
      new_cache = None
    else:
      xk = jnp.concatenate([jax.lax.stop_gradient(cache.x.astype(x.dtype)), x], axis=1)
      k_meta = tuple(jnp.concatenate([c, n], axis=1) for c, n in
                     ((cache.idx, index), (cache.pos, positions), (cache.seg, seg)))
      o = attend(x, xk, (index, positions, seg), k_meta)
      new_cache = self._write(cache, x, index, positions, seg)

    y = nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="o_proj",
                        kernel_init=axes.param(nn.initializers.lecun_normal(), axes.HEADS,
                                               axes.KV, axes.EMBED),
                        bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(o)  # [b, t, d]
    return y, new_cache

  @staticmethod
  def _parallel(attend, x, index, positions, seg, seg_len, look):
    """Blocks of L queries by index, each over the P + L keys before and in it."""
    b, t, d = x.shape
    n = -(-t // seg_len)
    pad = n * seg_len - t
    ext = lambda a, fill, front: jnp.concatenate(
        [jnp.full((b, look) + a.shape[2:], fill, a.dtype) if front else a[:, :0],
         a, jnp.full((b, pad) + a.shape[2:], fill, a.dtype)], axis=1)
    # Padded tail rows get real (larger) indices: later than every real query, never seen.
    idx_tail = jnp.concatenate([index, index[:, -1:] + 1 + jnp.arange(pad)[None]], axis=1)
    q_meta = [a.reshape(b * n, seg_len) for a in
              (idx_tail, ext(positions, 0, False), ext(seg, 0, False))]
    xq = ext(x, 0, False).reshape(b * n, seg_len, d)                  # [b n, L, d]
    # Keys: P invalid rows in front, then the padded sequence; block m reads rows
    # [m L, m L + P + L) of that, i.e. tokens [m L − P, m L + L).
    win = (np.arange(n)[:, None] * seg_len + np.arange(look + seg_len)[None])   # [n, P + L]
    keys = lambda a: a[:, win].reshape((b * n, look + seg_len) + a.shape[2:])
    k_idx = jnp.concatenate([jnp.full((b, look), -1, jnp.int32), idx_tail], axis=1)
    k_meta = (keys(k_idx), keys(ext(positions, 0, True)), keys(ext(seg, 0, True)))
    o = attend(xq, keys(ext(x, 0, True)), q_meta, k_meta)             # [b n, L, h, dh]
    return o.reshape((b, n * seg_len) + o.shape[2:])[:, :t]

  @staticmethod
  def _write(cache, x, index, positions, seg):
    """The last S new tokens into the ring (token n -> slot n mod S)."""
    b, t = index.shape
    s = cache.x.shape[1]
    keep = min(t, s)
    slots = index[:, t - keep:] % s
    rows = jnp.arange(b)[:, None]
    put = lambda buf, new: buf.at[rows, slots].set(new[:, t - keep:].astype(buf.dtype))
    return TransformerXLCache(x=put(cache.x, x), idx=put(cache.idx, index),
                              pos=put(cache.pos, positions), seg=put(cache.seg, seg),
                              length=cache.length + t)
