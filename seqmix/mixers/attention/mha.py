"""MHA: causal multi-head softmax attention (Vaswani et al., NeurIPS 2017), with the usual
modern options: grouped / multi-query key-value heads, RoPE or ALiBi, a sliding window,
QK-norm.

    q = x W_q [B,T,H,Dh],  k = x W_k, v = x W_v [B,T,G,Dh]     (G = num_kv_heads; H % G == 0)
    q, k <- RMSNorm_head(q), RMSNorm_head(k)                   (qk_norm)
    q, k <- rope(q, positions), rope(k, positions)              (position="rope")
    q, k <- c.rotate(q, k, positions); bias <- c.bias(...)      (another registered component c,
                                                                 seqmix.positional.base)
    o = softmax(Dh^-1/2 q kᵀ + alibi | causal, window, segments) v   (seqmix.ops.attention)
    y = dropout(o) W_o

Decoding keeps a KV cache (`MHACache`): keys (after RoPE) and values of the tokens seen, with
each slot's token index (its place in the stream: causality and the window are decided on it,
exactly as the parallel form decides them on the index within the sequence), its position
(for ALiBi) and its segment id. Without a window the cache has `max_len` slots and token n
goes to slot n (tokens beyond max_len are dropped: size the cache for the whole stream); with
`window=W` it is a ring buffer of W slots (token n -> slot n mod W), enough because a query
sees only itself and the W − 1 tokens before it. A call with a cache attends from its T new
tokens to [cache slots, new tokens] with an explicit mask, then writes the new tokens in.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common.norms import RMSNorm
from seqmix.ops import attention as attention_op
from seqmix.parallel import axes
from seqmix.parallel import dispatch
from seqmix.positional import alibi, rope
from seqmix.positional import base as positional
from seqmix.positional import rope_scaling as rope_scaling_lib

# The encodings mha applies inline (as before the positional registry); every other
# registered name (seqmix.positional.base.names()) is applied through its component.
POSITIONS = ("rope", "alibi", "none")


class MHACache(NamedTuple):
  k: jax.Array       # [B, S, G, Dh] keys (RoPE applied), cache dtype
  v: jax.Array       # [B, S, G, Dh] values, cache dtype
  idx: jax.Array     # [B, S] int32 token index held by each slot (−1: empty)
  pos: jax.Array     # [B, S] int32 position of each slot's token as the bias sees it (ALiBi
                     # distances; a component's bias_positions, e.g. BiPE's sentence index)
  seg: jax.Array     # [B, S] int32 segment id of each slot's token
  length: jax.Array  # [B] int32 tokens seen so far (the next token's index)


@registry.register(
    "mha", paper="Attention Is All You Need", year=2017, venue="NeurIPS", family="attention",
    op="attention.attention", constant_state=False,
    test_kwargs={"num_heads": 4, "num_kv_heads": 2}, url="https://arxiv.org/abs/1706.03762",
    sequence_parallel=True)
class MHA(MixerBase):
  """Causal multi-head attention.  x [B,T,D] -> y [B,T,D].

  num_heads: query heads H.
  num_kv_heads: key/value heads G (None: H, plain MHA; 1: multi-query; else grouped-query).
    Must divide num_heads; query head i reads kv head i // (H/G).
  head_dim: Dh (None: d_model // num_heads, which must then divide evenly).
  position: a registered positional component (`seqmix.positional.base.names()`): "rope",
    "alibi", "none" (applied inline, as always), or e.g. "t5", "kerple_log", "fire", "xpos",
    "cope" (applied through the component: a rotation of q/k before caching and/or an
    additive logit bias computed for the cached positions when decoding). Learned absolute
    positions are the model's job.
  position_kwargs: options of a registry component (dict, e.g. {"num_buckets": 64} for
    "t5"); None for the defaults. Not used by rope / alibi / none.
  rope_base: RoPE base (10000). rope_fraction: share of each head's channels that rotate
    (rotate-half layout, see `seqmix.positional.rope`).
  rope_scaling: None, or a Hugging Face `rope_scaling` dict (`seqmix.positional.rope_scaling`).
  window: None, or W: each token attends to itself and the W − 1 tokens before it; decoding
    then keeps a ring buffer of W slots.
  qk_norm: RMSNorm (learned scale [Dh]) on every query and key head before RoPE.
  use_bias: biases on the q/k/v/output projections.
  o_bias: None (default: as use_bias), or whether the output projection has a bias on its own
    (RecurrentGemma: q/k/v without, output with).
  dropout: dropout rate on the attention output (before W_o); only when not deterministic
    (needs a "dropout" rng).
  attn_dropout: dropout rate on the attention probabilities (nanoGPT's attn_dropout); only
    in the parallel form when not deterministic. The op supports it in its `reference`
    form only, so `impl` must be "auto" or "reference" when it is used.
  impl: `seqmix.ops.attention.attention` impl; the impl named here is the impl run.
  """
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  position: str = "rope"
  rope_base: float = 10000.0
  rope_fraction: float = 1.0
  rope_scaling: dict | None = None
  window: int | None = None
  qk_norm: bool = False
  use_bias: bool = False
  o_bias: bool | None = None
  dropout: float = 0.0
  attn_dropout: float = 0.0
  impl: str = "auto"
  position_kwargs: Any = None

  def _dims(self):
    """(H, G, Dh), after checking the configuration."""
    h = self.num_heads
    if h < 1:
      raise ValueError(f"num_heads={h} must be >= 1.")
    if self.head_dim is None:
      check_divisible("d_model", self.d_model, h, "num_heads")
    dh = self.head_dim or self.d_model // h
    g = self.num_kv_heads or h
    check_divisible("num_heads", h, g, "num_kv_heads")
    if positional.get(self.position).builtin and self.position_kwargs:
      raise ValueError(f"position_kwargs={self.position_kwargs!r} given, but position="
                       f"{self.position!r} takes none (its options are mha's rope_* fields).")
    if self.position == "rope":
      rope.rotary_dim(dh, self.rope_fraction)
      rope_scaling_lib.rope_type(self.rope_scaling)
    if self.window is not None and self.window < 1:
      raise ValueError(f"window={self.window} must be >= 1 (keys a token sees, itself "
                       "included) or None.")
    for name in ("dropout", "attn_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1).")
    return h, g, dh

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> MHACache:
    """Empty KV cache: max_len slots, or a ring of min(window, max_len) slots."""
    _, g, dh = self._dims()
    s = max_len if self.window is None else min(self.window, max_len)
    return MHACache(k=jnp.zeros((batch_size, s, g, dh), dtype),
                    v=jnp.zeros((batch_size, s, g, dh), dtype),
                    idx=jnp.full((batch_size, s), -1, jnp.int32),
                    pos=jnp.zeros((batch_size, s), jnp.int32),
                    seg=jnp.zeros((batch_size, s), jnp.int32),
                    length=jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], MHACache | None).

    segment_ids [B,T]: packed documents never attend to each other (also across decoding
    calls: the cache keeps each slot's id). positions [B,T]: token positions for RoPE/ALiBi
    (default arange(T), plus the cache length when decoding).
    """
    h, g, dh = self._dims()
    b, t, _ = x.shape
    x = x.astype(self.dtype)

    q, k, v = self._project_qkv(x, h, g, dh)   # [b, t, h|g, dh]
    q, k = self._transform_qk(q, k)

    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
    index = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]     # [b, t] token index
    positions = index if positions is None else positions.astype(jnp.int32)
    if self.position == "rope":
      q, k = self._rope(q, positions), self._rope(k, positions)
    slopes = alibi.alibi_slopes(h) if self.position == "alibi" else None
    pe = self._component(h, dh)
    if pe is not None:
      q, k = pe.rotate(q, k, positions)
      positions = pe.bias_positions(positions, cache)

    if cache is None:
      bias = None if slopes is None else alibi.alibi_bias(slopes, positions, positions)
      if pe is not None and pe.BIAS:
        bias = self._parallel_bias(pe, q, k, index, positions, segment_ids)
      drop = self.attn_dropout if not deterministic else 0.0
      patterns = self._patterns(positions, positions)
      if patterns is not None:
        if drop:
          raise ValueError(f"{type(self).__name__}: attn_dropout={self.attn_dropout} is not "
                           "supported with a sparse pattern; set attn_dropout=0.")
        o = self._pattern_attention(q, k, v, patterns, 0.0 if bias is None else bias,
                                    causal=True, window=self.window, segment_ids=segment_ids)
        return self._out(o, deterministic), None
      o, _ = dispatch.attention(q, k, v, causal=True, window=self.window,
                                segment_ids=segment_ids, bias=bias, dropout_rate=drop,
                                dropout_rng=self.make_rng("dropout") if drop else None,
                                impl=self.impl)
      new_cache = None
    else:
      o, new_cache = self._decode(q, k, v, index, positions, segment_ids, cache, slopes, pe)

    return self._out(o, deterministic), new_cache

  def _project_qkv(self, x, h, g, dh):
    """The q/k/v projections (params q_proj/k_proj/v_proj), then qk_norm if set; shared with
    the subclasses that write their own attention (remapped, tova).

    x [B,T,D] -> (q [B,T,H,Dh], k [B,T,G,Dh], v [B,T,G,Dh]). Call from a compact __call__.
    """
    def proj_in(heads, name):
      return nn.DenseGeneral((heads, dh), use_bias=self.use_bias, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name,
                             kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED,
                                                    axes.HEADS, axes.KV),
                             bias_init=axes.param(nn.initializers.zeros, axes.HEADS, axes.KV))

    q = proj_in(h, "q_proj")(x)   # [b, t, h, dh]
    k = proj_in(g, "k_proj")(x)   # [b, t, g, dh]
    v = proj_in(g, "v_proj")(x)   # [b, t, g, dh]
    if self.qk_norm:
      norm = lambda name: RMSNorm(axis_name=axes.KV, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=name)
      q, k = norm("q_norm")(q), norm("k_norm")(k)
    return q, k, v

  def _rope(self, y, positions):
    """RoPE with this module's rope_base / rope_fraction / rope_scaling.  y [B,T,N,Dh]."""
    return rope.apply_rope(y, positions, base=self.rope_base, fraction=self.rope_fraction,
                           rope_scaling=self.rope_scaling)

  def _out(self, o, deterministic):
    """dropout(o) W_o.  o [B,T,H,Dh] -> y [B,T,D]."""
    return self._o_proj(o, deterministic, self.use_bias if self.o_bias is None else self.o_bias)

  def _o_proj(self, o, deterministic, o_bias):
    """dropout(o) W_o (param o_proj) with the given output bias.  o [B,T,H,Dh] -> y [B,T,D]."""
    if self.dropout > 0:
      o = nn.Dropout(self.dropout)(o, deterministic=deterministic)
    y = nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=o_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="o_proj",
                        kernel_init=axes.param(nn.initializers.lecun_normal(), axes.HEADS,
                                               axes.KV, axes.EMBED),
                        bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(o)  # [b, t, d]
    return y

  def _transform_qk(self, q, k):
    """Hook on the projected heads (before RoPE and the cache): identity here; subclasses
    (e.g. cosine_attention's normalisation) may declare parameters."""
    return q, k

  def _patterns(self, q_pos, k_pos):
    """Sparse-attention patterns (subclasses: seqmix.mixers.attention.sparse): None here, or
    a tuple of bool masks [B, H|1, T, S] over the positions q_pos [B,T], k_pos [B,S] (within
    the document), applied on top of causality, the window and the segment ids. One mask:
    masked softmax; several: each a softmax, merged by log-sum-exp (LongNet)."""
    return None

  def _pattern_attention(self, q, k, v, patterns, base, **op_kw):
    """Attention under each pattern of `patterns`, merged by lse.  -> o [B,T,H,Dh].

    Pattern-masked logits get the finite −1e30 (every pattern set must let each query see at
    least one key through some pattern; a query no key of one pattern reaches gets a weight
    exp(−1e30 − lse) = 0 for that pattern in the merge). The masks and the bias are dense
    [B, H|1, T, S]: O(T·S) memory.
    """
    biases = [jnp.where(m, base, jnp.float32(-1e30)) for m in patterns]
    if len(biases) == 1:
      return attention_op.attention(q, k, v, bias=biases[0], impl=self.impl, **op_kw)[0]
    o, lse = None, None
    for bias in biases:
      o_i, lse_i = attention_op.blockwise_attention(q, k, v, bias=bias, impl=self.impl, **op_kw)
      o, lse = (o_i, lse_i) if o is None else attention_op.merge_partials(o, lse, o_i, lse_i)
    return o

  def _component(self, h, dh):
    """The registered positional component (None for the inline rope / alibi / none)."""
    if positional.get(self.position).builtin:
      return None
    return positional.build(self.position, num_heads=h, head_dim=dh, rope_base=self.rope_base,
                            rope_fraction=self.rope_fraction, kwargs=self.position_kwargs)

  def _parallel_bias(self, pe, q, k, index, positions, segment_ids):
    """The component's bias [B|1,H,T,T] over the whole sequence (the mask only if it reads
    content: the op applies causality, window and segments itself)."""
    visible = None
    if pe.CONTENT:
      visible = index[:, None, :] <= index[:, :, None]                # [b, t, t]
      if self.window is not None:
        visible &= index[:, None, :] > index[:, :, None] - self.window
      if segment_ids is not None:
        visible &= segment_ids[:, None, :] == segment_ids[:, :, None]
    return pe.bias(q, k, positions, positions, visible=visible)

  def _decode(self, q, k, v, index, positions, segment_ids, cache, slopes, pe=None):
    """Attend from T new tokens to [cache slots, new tokens]; write the new tokens in.

    q [B,T,H,Dh], k/v [B,T,G,Dh], index/positions [B,T] -> (o [B,T,H,Dh], MHACache).
    """
    b, t = index.shape
    seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    k_all = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)   # [b, s + t, g, dh]
    v_all = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
    idx_all = jnp.concatenate([cache.idx, index], axis=1)           # [b, s + t]
    pos_all = jnp.concatenate([cache.pos, positions], axis=1)
    seg_all = jnp.concatenate([cache.seg, seg], axis=1)
    k_idx = idx_all[:, None, :]                                      # [b, 1, s + t]
    q_idx = index[:, :, None]                                        # [b, t, 1]
    visible = (k_idx >= 0) & (k_idx <= q_idx) & (seg_all[:, None, :] == seg[:, :, None])
    if self.window is not None:
      visible &= k_idx > q_idx - self.window                         # [b, t, s + t]
    base = 0.0 if slopes is None else alibi.alibi_bias(slopes, positions, pos_all)
    if pe is not None and pe.BIAS:   # the bias of the cached positions only: [b, h, t, s + t]
      base = pe.bias(q, k_all, positions, pos_all, k_idx=idx_all, visible=visible)
    # A finite mask value: every query sees at least itself, so no row is all-masked and
    # exp(mask − max) is exactly 0.
    patterns = self._patterns(positions, pos_all)
    if patterns is not None:
      o = self._pattern_attention(q, k_all, v_all, [m & visible[:, None] for m in patterns],
                                  base, causal=False)
    else:
      bias = jnp.where(visible[:, None], base, jnp.float32(-1e30))   # [b, h|1, t, s + t]
      o, _ = attention_op.attention(q, k_all, v_all, causal=False, bias=bias, impl=self.impl)

    s = cache.k.shape[1]
    n = t if self.window is None else min(t, s)   # a ring keeps only the last s new tokens
    slots = index[:, t - n:]
    if self.window is not None:
      slots = slots % s
    rows = jnp.arange(b)[:, None]
    put = lambda buf, new: buf.at[rows, slots].set(new[:, t - n:].astype(buf.dtype), mode="drop")
    new_cache = MHACache(k=put(cache.k, k), v=put(cache.v, v), idx=put(cache.idx, index),
                         pos=put(cache.pos, positions), seg=put(cache.seg, seg),
                         length=cache.length + t)
    return o, new_cache
