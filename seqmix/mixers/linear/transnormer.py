"""TransNormer (Qin et al., "The Devil in Linear Transformer", EMNLP 2022), causal form.

Two token mixers, chosen by depth: the first `diag_layers` layers (default: the first half of
the stack, as the paper) use DiagAttention, the others NormAttention.

DiagAttention: softmax attention inside non-overlapping blocks of `block_size` tokens,
causal within the block (block of token t = position_t // block_size):

    o_t = Σ_{s<=t, blk(s)=blk(t)} softmax_s(q_t·k_s / √(D/H)) v_s,    y = W_o o

NormAttention: linear attention with the elu+1 kernel, no 1/√d scaling and no denominator;
the unbounded sum is normalised afterwards (the paper's fix for unbounded gradients):

    φ(x) = elu(x) + 1,   o_t = φ(q_t) Σ_{s<=t} φ(k_s)ᵀ v_s,    y = W_o RMSNorm(o)

NormAttention is one `linear_attention.gla` call (g=None, scale 1); DiagAttention is one
`attention.attention` call with segment ids that change at every block and document boundary.
RMSNorm (learned scale, over the D merged channels) is one of the norms the paper compares
(LayerNorm, RMSNorm); seqmix fixes RMSNorm. Not included: the paper's positional encodings
(the LM experiments used none inside the mixers beyond learned absolute ones: the registry
marks this mixer `needs_positions`), dropout.

Decoding. NormAttention keeps the state [B,H,D/H,D/H]; DiagAttention keeps the last
`block_size` keys/values with their positions and segment ids (the current block never holds
more), so both caches have a constant size.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.feature_maps import elu_feature_map
from seqmix.mixers.common.norms import RMSNorm
from seqmix.mixers.common.projections import sharded_dense
from seqmix.parallel import axes
from seqmix.parallel import dispatch


class NormAttentionCache(NamedTuple):
  state: jax.Array  # [B, H, K, V] float32: Σ φ(k)ᵀ v
  seg: jax.Array    # [B] int32 segment id of the last token seen


class DiagAttentionCache(NamedTuple):
  k: jax.Array       # [B, S, H, K] the last S = block_size keys, oldest first, cache dtype
  v: jax.Array       # [B, S, H, V] their values
  pos: jax.Array     # [B, S] int32 their positions (−1: empty slot)
  seg: jax.Array     # [B, S] int32 their segment ids
  length: jax.Array  # [B] int32 tokens seen so far (default position of the next token)


def block_segment_ids(pos, seg, valid):
  """[B, T] int32 ids equal exactly within one (document, block) run of valid tokens, −1 where
  not valid. pos [B,T] block index of each token, seg [B,T] document id, valid [B,T] bool."""
  prev_pos = jnp.concatenate([pos[:, :1], pos[:, :-1]], axis=1)
  prev_seg = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
  prev_valid = jnp.concatenate([jnp.zeros_like(valid[:, :1]), valid[:, :-1]], axis=1)
  start = (pos != prev_pos) | (seg != prev_seg) | ~prev_valid
  ids = jnp.cumsum(start.astype(jnp.int32), axis=1)
  return jnp.where(valid, ids, -1)


@registry.register(
    "transnormer", paper="The Devil in Linear Transformer", year=2022, venue="EMNLP",
    family="linear-attention", op="linear_attention.gla + attention.attention",
    parents=("linear_transformer", "mha"), constant_state=True,
    test_kwargs={"num_heads": 2, "block_size": 16, "diag_layers": 1},
    url="https://arxiv.org/abs/2210.10340", needs_positions=True)
class TransNormer(MixerBase):
  """DiagAttention (early layers) or NormAttention (later layers).  x [B,T,D] -> y [B,T,D].

  num_heads: H; q, k, v have D/H channels per head.
  block_size: tokens per DiagAttention block (the paper: 64).
  diag_layers: layers [0, diag_layers) use DiagAttention, the rest NormAttention; −1 (default)
    means n_layers // 2 (the paper's first half).
  use_bias: biases on the q/k/v/output projections.
  norm_eps: eps of NormAttention's RMSNorm.
  chunk_size, impl: passed to `linear_attention.gla` (NormAttention).
  attn_impl: passed to `attention.attention` (DiagAttention).
  """
  num_heads: int = 8
  block_size: int = 64
  diag_layers: int = -1
  use_bias: bool = True
  norm_eps: float = 1e-6
  chunk_size: int = 64
  impl: str = "auto"
  attn_impl: str = "auto"

  @property
  def is_diag(self) -> bool:
    n = self.n_layers // 2 if self.diag_layers < 0 else self.diag_layers
    return self.layer_idx < n

  def _check(self):
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    if self.block_size < 1:
      raise ValueError(f"block_size={self.block_size} must be >= 1 (tokens per DiagAttention "
                       "block; the paper uses 64).")

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    """NormAttentionCache (float32 state) or DiagAttentionCache (block_size slots in `dtype`)."""
    del max_len  # both caches have a constant size
    self._check()
    h, hd = self.num_heads, self.d_model // self.num_heads
    if not self.is_diag:
      return NormAttentionCache(jnp.zeros((batch_size, h, hd, hd), jnp.float32),
                                jnp.full((batch_size,), -1, jnp.int32))
    s = self.block_size
    return DiagAttentionCache(jnp.zeros((batch_size, s, h, hd), dtype),
                              jnp.zeros((batch_size, s, h, hd), dtype),
                              jnp.full((batch_size, s), -1, jnp.int32),
                              jnp.full((batch_size, s), -1, jnp.int32),
                              jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], NormAttentionCache | DiagAttentionCache | None).

    positions [B,T]: positions that define DiagAttention's blocks (default arange(T) + tokens
    cached); NormAttention ignores them.
    """
    del deterministic
    self._check()
    b, t, d = x.shape
    h = self.num_heads
    dense = lambda in_axis, out_axis, name: sharded_dense(
        d, in_axis, out_axis, name, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    q, k, v = (dense(axes.EMBED, axes.HEADS, n)(x).reshape(b, t, h, -1)  # [b, t, h, d/h]
               for n in ("q_proj", "k_proj", "v_proj"))
    if self.is_diag:
      o, new_cache = self._diag(q, k, v, segment_ids, positions, cache)
    else:
      o, new_cache = self._norm(q, k, v, segment_ids, cache)
    y = dense(axes.HEADS, axes.EMBED, "o_proj")(o)
    return y, new_cache

  def _norm(self, q, k, v, segment_ids, cache):
    b, t, h, hd = v.shape
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    g = segments.reset_log_gate(None, starts, shape=(b, t, h))
    o, state = dispatch.gla(elu_feature_map(q), elu_feature_map(k), v, g, scale=1.0,
                            initial_state=None if cache is None else cache.state,
                            chunk_size=self.chunk_size, impl=self.impl)
    o = RMSNorm(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                name="norm")(o.reshape(b, t, h * hd))                  # [b, t, d]
    new_cache = None if cache is None else NormAttentionCache(
        state, segments.last_segment_id(segment_ids, b))
    return o, new_cache

  def _diag(self, q, k, v, segment_ids, positions, cache):
    b, t, h, hd = v.shape
    offset = 0 if cache is None else cache.length[:, None]
    if positions is None:
      positions = jnp.arange(t, dtype=jnp.int32)[None, :] + offset
    positions = jnp.broadcast_to(positions.astype(jnp.int32), (b, t))
    seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    attend = lambda kk, vv, ids: dispatch.attention(
        q, kk, vv, causal=True, scale=hd ** -0.5, segment_ids=ids, impl=self.attn_impl)[0]
    if cache is None:
      ids = block_segment_ids(positions // self.block_size, seg, jnp.ones((b, t), bool))
      return attend(k, v, ids).reshape(b, t, h * hd), None
    s = self.block_size
    all_k = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)   # [b, s + t, h, d/h]
    all_v = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
    all_pos = jnp.concatenate([cache.pos, positions], axis=1)            # [b, s + t]
    all_seg = jnp.concatenate([cache.seg, seg], axis=1)
    valid = all_pos >= 0
    kv_ids = block_segment_ids(jnp.where(valid, all_pos // s, -1), all_seg, valid)
    # Queries are the last t keys (attention's default q_offset = S_k − T_q).
    o = attend(all_k.astype(q.dtype), all_v.astype(q.dtype), (kv_ids[:, -t:], kv_ids))
    new_cache = DiagAttentionCache(all_k[:, -s:], all_v[:, -s:], all_pos[:, -s:],
                                   all_seg[:, -s:], cache.length + t)
    return o.reshape(b, t, h * hd), new_cache
