"""Infini-attention (Munkhdalai et al., "Leave No Context Behind", arXiv 2024): causal
softmax attention within each segment, plus a compressive linear-attention memory of every
earlier segment of the document, mixed by a learned per-head gate.

Segments are counted in positions, as in `transformer_xl`: token i (position p_i, restarting
at 0 in every packed document) lies in segment ⌊p_i / L⌋ of its document; a segment is a
maximal run of consecutive tokens with the same (document, ⌊p / L⌋). With σ = ELU + 1 and,
for the segment s that holds token i, M_{s−1}, z_{s−1} the memory of the document's
earlier segments:

    q, k, v = x W_q, x W_k, x W_v                                      [B,T,H,Dh]
    A_mem_i = σ(q_i) M_{s−1} / (σ(q_i)·z_{s−1} + eps)                  (0 in a first segment)
    A_dot_i = Σ_{j ∈ s, j <= i} softmax_j(rope(q_i)·rope(k_j) / √Dh) v_j
    o_i     = sigmoid(β) A_mem_i + (1 − sigmoid(β)) A_dot_i            β [H]
    y_i     = o_i W_o
    at the end of segment s:  M_s = M_{s−1} + Σ_{j ∈ s} σ(k_j)ᵀ v_j,  z_s = z_{s−1} + Σ_{j ∈ s} σ(k_j)

(the paper's "linear" memory update; M_0 = 0, z_0 = 0 at every document start). The paper's
"linear + delta" update (M_s += σ(K)ᵀ(V − σ(K)M_{s−1}/(σ(K)z_{s−1})), a segment-batched
delta step) is not built: it is neither `gla` nor the token-level `delta_rule` op, and
`update="delta"` raises NotImplementedError. The paper leaves the local attention's position
encoding open; here it is RoPE on the caller's positions (`position="rope"`) or none.

The memory goes through ONE `seqmix.ops.linear_attention.gla` call (g = None, scale 1, v with a
column of ones appended so the state [Dh, Dh + 1] carries M and z): every segment of ℓ
tokens becomes ℓ read elements (query σ(q), key 0) followed by ℓ write elements (query 0,
key σ(k), value [v, 1]), so a read sees exactly the writes of earlier segments; a document
start is a −inf gate on its first read (a reset). The local attention is
`seqmix.ops.attention.attention` with the segments as segment ids.

Decoding (`InfiniAttentionCache`): the committed memory [B,H,Dh,Dh+1] (every finished segment)
and the tokens of the current, unfinished segment (keys before RoPE, values, positions, ids:
a buffer of L slots, right-aligned): the memory is updated at a segment boundary, when the
first token of the next segment arrives, by writing the buffered segment. A call, with or
without a cache, runs the same computation over [buffer; new tokens] (the parallel form
starts from the empty cache), so decode == parallel holds by the same algebra the direct
test checks. The buffer holds a whole segment when positions advance by one per token within
a document (segments then have at most L tokens); an unbroken run of more than L tokens with
equal ⌊p / L⌋ would lose its oldest tokens between calls.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.parallel import axes
from seqmix.parallel import dispatch
from seqmix.positional import rope

POSITIONS = ("rope", "none")
UPDATES = ("linear", "delta")


class InfiniAttentionCache(NamedTuple):
  mem: jax.Array       # [B, H, Dh, Dh + 1] float32: [M | z] of the finished segments
  k: jax.Array         # [B, L, H, Dh] keys (before RoPE) of the current segment, right-aligned
  v: jax.Array         # [B, L, H, Dh] its values
  pos: jax.Array       # [B, L] int32 positions of the buffered tokens
  seg: jax.Array       # [B, L] int32 document ids of the buffered tokens
  valid: jax.Array     # [B, L] bool: the slot holds a token of the current segment
  last_pos: jax.Array  # [B] int32 position of the last token seen
  last_seg: jax.Array  # [B] int32 document id of the last token seen (−1: none yet)
  length: jax.Array    # [B] int32 tokens seen so far


def _runs(ids):
  """Start and length of the run of equal `ids` [B, N] around each element -> ([B,N], [B,N])."""
  b, n = ids.shape
  ar = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  new = jnp.concatenate([jnp.ones((b, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(new, ar, 0), axis=1)
  nxt = jnp.concatenate([jnp.where(new, ar, n)[:, 1:], jnp.full((b, 1), n, jnp.int32)], axis=1)
  end = jax.lax.cummin(nxt, axis=1, reverse=True)
  return start, end - start


@registry.register(
    "infini_attention", paper="Leave No Context Behind: Efficient Infinite Context Transformers "
    "with Infini-attention", year=2024, venue="arXiv", family="memory",
    op="attention.attention + linear_attention.gla", parents=("mha", "linear_transformer"),
    constant_state=True, test_kwargs={"num_heads": 2, "segment_len": 4},
    url="https://arxiv.org/abs/2404.07143")
class InfiniAttention(MixerBase):
  """Infini-attention.  x [B,T,D] -> y [B,T,D].

  num_heads: H. head_dim: Dh (None: d_model // num_heads).
  segment_len: L, tokens per segment (counted in positions, ⌊p / L⌋).
  update: "linear" (built) | "delta" (NotImplementedError).
  position: "rope" | "none", the local attention's position encoding.
  rope_base: RoPE base.
  eps: added to the memory read's normaliser σ(q)·z (0 before any segment is written).
  use_bias: biases on the q/k/v/output projections.
  chunk_size, impl: `gla` chunk size and impl (of the memory); attn_impl: the local
    attention's `attention` impl.
  """
  num_heads: int = 4
  head_dim: int | None = None
  segment_len: int = 128
  update: str = "linear"
  position: str = "rope"
  rope_base: float = 10000.0
  eps: float = 1e-6
  use_bias: bool = False
  chunk_size: int = 64
  impl: str = "auto"
  attn_impl: str = "auto"

  def _dims(self):
    h = self.num_heads
    if h < 1:
      raise ValueError(f"num_heads={h} must be >= 1.")
    if self.head_dim is None:
      check_divisible("d_model", self.d_model, h, "num_heads")
    if not isinstance(self.segment_len, int) or self.segment_len < 1:
      raise ValueError(f"segment_len={self.segment_len!r} must be a positive int (tokens per "
                       "segment).")
    if self.update not in UPDATES:
      raise ValueError(f"update={self.update!r} is not one of {UPDATES}.")
    if self.update == "delta":
      raise NotImplementedError(
          "infini_attention update='delta' (the paper's segment-batched delta step) is not "
          "built; update='linear' is.")
    if self.position not in POSITIONS:
      raise ValueError(f"position={self.position!r} is not one of {POSITIONS}.")
    if self.eps <= 0:
      raise ValueError(f"eps={self.eps} must be > 0 (it keeps the empty memory's read 0/eps).")
    return h, self.head_dim or self.d_model // h, self.segment_len

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> InfiniAttentionCache:
    """The empty memory and an empty segment buffer of L slots (max_len is not needed)."""
    h, dh, seg_len = self._dims()
    b = batch_size
    zeros_i = jnp.zeros((b, seg_len), jnp.int32)
    return InfiniAttentionCache(
        mem=jnp.zeros((b, h, dh, dh + 1), jnp.float32),
        k=jnp.zeros((b, seg_len, h, dh), dtype), v=jnp.zeros((b, seg_len, h, dh), dtype),
        pos=zeros_i, seg=zeros_i, valid=jnp.zeros((b, seg_len), bool),
        last_pos=jnp.zeros((b,), jnp.int32), last_seg=jnp.full((b,), -1, jnp.int32),
        length=jnp.zeros((b,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], InfiniAttentionCache | None).

    positions [B,T]: default arange(T) plus the tokens already seen; they decide the segments.
    segment_ids [B,T]: packed documents (the memory resets at each document start).
    """
    h, dh, seg_len = self._dims()
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
    beta = self.param("beta", axes.param(nn.initializers.zeros, axes.HEADS), (h,),
                      self.param_dtype)

    index = cache.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [b, t]
    pos = index if positions is None else positions.astype(jnp.int32)
    seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))

    # Segment starts of the new tokens (the one before the first is the cache's last token).
    prev_seg = jnp.concatenate([cache.last_seg[:, None], seg[:, :-1]], axis=1)
    prev_pos = jnp.concatenate([cache.last_pos[:, None], pos[:, :-1]], axis=1)
    doc_start = seg != prev_seg
    doc_start = doc_start.at[:, 0].set(doc_start[:, 0] | (cache.length == 0))
    starts = doc_start | (pos // seg_len != prev_pos // seg_len)          # [b, t]
    # Extended sequence E = [buffer (L slots, right-aligned); new tokens]: run ids -1 on empty
    # slots, 0 on the buffered segment, then one id per new segment.
    run_new = jnp.cumsum(starts.astype(jnp.int32), axis=1)               # [b, t]
    run = jnp.concatenate([jnp.where(cache.valid, 0, -1), run_new], axis=1)  # [b, L + t]
    k_ext = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)        # [b, L + t, h, dh]
    v_ext = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
    pos_ext = jnp.concatenate([cache.pos, pos], axis=1)
    is_new = jnp.concatenate([jnp.zeros((b, seg_len), bool), jnp.ones((b, t), bool)], axis=1)
    valid = jnp.concatenate([cache.valid, jnp.ones((b, t), bool)], axis=1)

    # Local softmax attention within segments (new queries over E).
    q_loc, k_loc = q, k_ext
    if self.position == "rope":
      q_loc = rope.apply_rope(q, pos, base=self.rope_base)
      k_loc = rope.apply_rope(k_ext, pos_ext, base=self.rope_base)
    o_dot, _ = dispatch.attention(q_loc, k_loc, v_ext, causal=True,
                                  segment_ids=(run_new, run), impl=self.attn_impl)

    # Compressive memory: reads then writes of each run, one gla call over 2(L + t) elements.
    n = seg_len + t
    last = run[:, -1:]
    write = valid & (run != last)                                          # [b, n]
    start, size = _runs(run)
    ar = jnp.arange(n, dtype=jnp.int32)[None]
    at_read, at_write = ar + start, ar + start + size                      # [b, n] in [0, 2n)
    rows = jnp.arange(b)[:, None]
    feat = lambda z: jax.nn.elu(z.astype(jnp.float32)) + 1.0
    zero = jnp.zeros((b, n, h, dh), jnp.float32)
    sq_ext = jnp.concatenate([zero[:, :seg_len], feat(q)], axis=1)         # reads: new only
    sk_ext = feat(k_ext) * write[:, :, None, None]
    v1 = jnp.concatenate([v_ext.astype(jnp.float32), jnp.ones((b, n, h, 1), jnp.float32)],
                         axis=-1) * write[:, :, None, None]                 # [b, n, h, dh + 1]
    aug = lambda r, w: jnp.zeros((b, 2 * n) + r.shape[2:], r.dtype).at[rows, at_read].set(
        r).at[rows, at_write].set(w)
    q_aug = aug(sq_ext, zero)                                              # [b, 2n, h, dh]
    k_aug = aug(zero, sk_ext)
    v_aug = aug(jnp.zeros_like(v1), v1)
    reset = jnp.concatenate([jnp.zeros((b, seg_len), bool), doc_start], axis=1) & is_new
    g = jnp.zeros((b, 2 * n, h), jnp.float32).at[rows, at_read].set(
        jnp.where(reset, -jnp.inf, 0.0)[:, :, None])
    o_aug, mem = dispatch.gla(q_aug, k_aug, v_aug, g, scale=1.0, initial_state=cache.mem,
                              chunk_size=self.chunk_size, impl=self.impl)
    o_read = jnp.take_along_axis(o_aug, at_read[:, seg_len:, None, None], axis=1)  # [b,t,h,dh+1]
    a_mem = o_read[..., :-1] / (o_read[..., -1:] + self.eps)

    gate = jax.nn.sigmoid(beta.astype(jnp.float32))[:, None]              # [h, 1]
    o = (gate * a_mem + (1.0 - gate) * o_dot.astype(jnp.float32)).astype(self.dtype)
    y = nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="o_proj",
                        kernel_init=axes.param(nn.initializers.lecun_normal(), axes.HEADS,
                                               axes.KV, axes.EMBED),
                        bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(o)  # [b, t, d]
    if given is None:
      return y, None
    tail = lambda a: a[:, n - seg_len:]
    new_cache = InfiniAttentionCache(
        mem=mem, k=tail(k_ext).astype(cache.k.dtype), v=tail(v_ext).astype(cache.v.dtype),
        pos=tail(pos_ext), seg=tail(jnp.concatenate([cache.seg, seg], axis=1)),
        valid=tail(valid & (run == last)), last_pos=pos[:, -1], last_seg=seg[:, -1],
        length=cache.length + t)
    return y, new_cache
