"""BiPE (He et al. 2024, "Two Stones Hit One Bird: Bilevel Positional Encoding for Better
Length Extrapolation"), the ALiBi form (BiPE-ALiBi)."""

import jax
import jax.numpy as jnp

from seqmix.positional import alibi, rope
from seqmix.positional.base import PositionalComponent, register


def bipe_positions(tokens, separator_id: int):
  """Intra-segment positions [B,T] for BiPE: 0 at the first token and right after every
  `separator_id` token (the separator closes its segment), counting up within a segment."""
  tokens = jnp.asarray(tokens)
  after_sep = jnp.concatenate([jnp.ones_like(tokens[:, :1], bool),
                               tokens[:, :-1] == separator_id], axis=1)        # [b, t]
  t = jnp.arange(tokens.shape[1])[None]
  last_start = jax.lax.cummax(jnp.where(after_sep, t, 0), axis=1)              # [b, t]
  return (t - last_start).astype(jnp.int32)


@register("bipe", paper="Two Stones Hit One Bird: Bilevel Positional Encoding for Better Length "
          "Extrapolation", year=2024, venue="ICML", url="https://arxiv.org/abs/2401.16421",
          parents=("alibi", "rope"))
class BiPE(PositionalComponent):
  """BiPE-ALiBi: intra-segment position by rotation, inter-segment position by an ALiBi bias.

      positions p_t: the caller's intra-segment positions (0 at each segment's first token;
        `bipe_positions(tokens, separator_id)` makes them from a separator token id)
      s_t = #{u ≤ t : p_u = 0} − 1                  (segment index: counts the resets)
      q'_t = R(p_t θ) q_t, k'_u = R(p_u θ) k_u       (RoPE by intra-segment position)
      b_h(t, u) = −m_h |s_t − s_u|                   (ALiBi slopes m_h, on segment indices)

  The paper encodes the intra-segment position absolutely at the input (sinusoidal or
  learned embeddings); inside an attention mixer it is applied here as a rotation by that
  position (θ_i = rope_base^(−2i/R), rope_fraction), which tokens of one segment see as
  their relative offset. The cache keeps each slot's segment index (MHACache.pos) and the
  count continues from the cached maximum, so decoding equals the parallel form. Packed
  documents restart positions at 0, so a new document also starts a new segment (the bias
  is shift invariant, and documents never attend to each other).
  """
  ROTATES = True
  BIAS = True

  def rotate(self, q, k, positions):
    kw = dict(base=self.rope_base, fraction=self.rope_fraction)
    return rope.apply_rope(q, positions, **kw), rope.apply_rope(k, positions, **kw)

  def bias_positions(self, positions, cache=None):
    b = positions.shape[0]
    prev = (jnp.full((b,), -1, jnp.int32) if cache is None
            else jnp.max(jnp.where(cache.idx >= 0, cache.pos, -1), axis=1))    # [b]
    starts = (positions == 0).astype(jnp.int32)
    return prev[:, None] + jnp.cumsum(starts, axis=1)                         # [b, t]

  def bias(self, q, k, q_pos, k_pos, *, k_idx=None, visible=None):
    del q, k, k_idx, visible
    return alibi.alibi_bias(alibi.alibi_slopes(self.num_heads), q_pos, k_pos)
