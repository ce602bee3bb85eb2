"""Landmark attention (Mohtashami & Jaggi, "Random-Access Infinite Context Length for
Transformers", NeurIPS 2023): blocks of ℓ tokens, each closed by a landmark whose key gates
access to its block (the grouped softmax of `seqmix.ops.landmark`).

Blocks are counted in positions: token j (position p_j, restarting per packed document)
lies in block ⌊p_j / ℓ⌋ of its document, and the token at p_j mod ℓ = ℓ − 1 is the block's
landmark. For query i (block c_i) and visible keys j (same document, j <= i):

    q, k, v = rope(x W_q), rope(x W_k), x W_v                                  [B,T,H,Dh]
    cur(i)    = {j : ⌊p_j/ℓ⌋ = c_i}
    gate(i)   = {j : ⌊p_j/ℓ⌋ < c_i, p_j mod ℓ = ℓ − 1}          (earlier blocks' landmarks)
    member(i) = {j : ⌊p_j/ℓ⌋ < c_i, p_j mod ℓ != ℓ − 1}
    o_i = grouped_softmax(q_i; cur, gate, member),  y_i = o_i W_o

The paper inserts a dedicated landmark token after every ℓ − 1 text tokens in the data
pipeline; that insertion is not built here, so with plain text the last token of every block
plays the landmark (its key gates the block, and later blocks see it only as the gate). The
paper's inference-time top-k block retrieval (exact here through the full grouped softmax)
and its position remapping are not built.

Decoding keeps a KV cache (`LandmarkCache`) of max_len slots (token n -> slot n; tokens
beyond max_len are dropped: size it for the stream); a call writes its tokens first and then
attends over the cache slots, the parallel form over its own tokens.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.ops import landmark as landmark_op
from seqmix.parallel import axes
from seqmix.positional import rope

POSITIONS = ("rope", "none")


class LandmarkCache(NamedTuple):
  k: jax.Array       # [B, S, H, Dh] keys (RoPE applied)
  v: jax.Array       # [B, S, H, Dh] values
  idx: jax.Array     # [B, S] int32 token index per slot (−1: empty)
  pos: jax.Array     # [B, S] int32 positions
  seg: jax.Array     # [B, S] int32 document ids
  length: jax.Array  # [B] int32 tokens seen


def _block_ids(valid, seg, blk):
  """Run ids over the key axis of equal (valid, document, block): [B, S] int32 in [0, S)."""
  change = ((valid[:, 1:] != valid[:, :-1]) | (seg[:, 1:] != seg[:, :-1])
            | (blk[:, 1:] != blk[:, :-1]))
  return jnp.concatenate([jnp.zeros_like(seg[:, :1]),
                          jnp.cumsum(change.astype(jnp.int32), axis=1)], axis=1)


@registry.register(
    "landmark", paper="Random-Access Infinite Context Length for Transformers (Landmark "
    "Attention)", year=2023, venue="NeurIPS", family="memory", op="landmark.grouped_softmax_attention",
    parents=("mha",), constant_state=False, test_kwargs={"num_heads": 2, "block_len": 4},
    url="https://arxiv.org/abs/2305.16300")
class Landmark(MixerBase):
  """Landmark attention.  x [B,T,D] -> y [B,T,D].

  num_heads: H. head_dim: Dh (None: d_model // num_heads).
  block_len: ℓ >= 2, tokens per block including its landmark (the paper: 50).
  position: "rope" | "none". rope_base: RoPE base.
  use_bias: biases on the projections.
  """
  num_heads: int = 4
  head_dim: int | None = None
  block_len: int = 50
  position: str = "rope"
  rope_base: float = 10000.0
  use_bias: bool = False

  def _dims(self):
    h = self.num_heads
    if h < 1:
      raise ValueError(f"num_heads={h} must be >= 1.")
    if self.head_dim is None:
      check_divisible("d_model", self.d_model, h, "num_heads")
    if not isinstance(self.block_len, int) or self.block_len < 2:
      raise ValueError(f"block_len={self.block_len!r} must be an int >= 2 (a block holds at "
                       "least one token besides its landmark).")
    if self.position not in POSITIONS:
      raise ValueError(f"position={self.position!r} is not one of {POSITIONS}.")
    return h, self.head_dim or self.d_model // h

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> LandmarkCache:
    h, dh = self._dims()
    z = jnp.zeros((batch_size, max_len), jnp.int32)
    return LandmarkCache(k=jnp.zeros((batch_size, max_len, h, dh), dtype),
                         v=jnp.zeros((batch_size, max_len, h, dh), dtype),
                         idx=jnp.full((batch_size, max_len), -1, jnp.int32), pos=z, seg=z,
                         length=jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], LandmarkCache | None)."""
    h, dh = self._dims()
    lb = self.block_len
    b, t, _ = x.shape
    x = x.astype(self.dtype)

    def dense(name):
      return nn.DenseGeneral((h, dh), use_bias=self.use_bias, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name,
                             kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED,
                                                    axes.HEADS, axes.KV),
                             bias_init=axes.param(nn.initializers.zeros, axes.HEADS, axes.KV))

    q, k, v = dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x)  # [b, t, h, dh]
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
    index = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]          # [b, t]
    pos = index if positions is None else positions.astype(jnp.int32)
    seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    if self.position == "rope":
      q = rope.apply_rope(q, pos, base=self.rope_base)
      k = rope.apply_rope(k, pos, base=self.rope_base)

    if cache is None:
      keys, new_cache = LandmarkCache(k, v, index, pos, seg, index[:, -1] + 1), None
    else:
      rows = jnp.arange(b)[:, None]
      put = lambda buf, new: buf.at[rows, index].set(new.astype(buf.dtype), mode="drop")
      keys = new_cache = LandmarkCache(k=put(cache.k, k), v=put(cache.v, v),
                                       idx=put(cache.idx, index), pos=put(cache.pos, pos),
                                       seg=put(cache.seg, seg), length=cache.length + t)
    ki, kp, ks = keys.idx[:, None], keys.pos[:, None], keys.seg[:, None]    # [b, 1, s]
    qi, qp, qs = index[:, :, None], pos[:, :, None], seg[:, :, None]        # [b, t, 1]
    visible = (ki >= 0) & (ki <= qi) & (ks == qs)
    earlier = visible & (kp // lb < qp // lb)
    is_landmark = kp % lb == lb - 1
    block = _block_ids(keys.idx >= 0, keys.seg, keys.pos // lb)
    o, _ = landmark_op.grouped_softmax_attention(
        q, keys.k.astype(q.dtype), keys.v.astype(v.dtype),
        cur=visible & (kp // lb == qp // lb), member=earlier & ~is_landmark,
        gate=earlier & is_landmark, block=block)
    y = nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="o_proj",
                        kernel_init=axes.param(nn.initializers.lecun_normal(), axes.HEADS,
                                               axes.KV, axes.EMBED),
                        bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(o)  # [b, t, d]
    return y, new_cache
