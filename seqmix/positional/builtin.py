"""The encodings `mha` applied before the registry, as components: rope, alibi, none.

`mha` keeps applying these three through its own inline code (`builtin=True`), so its
behaviour and parameters are exactly as before; these classes are the same maths for other
mixers that select a component by name (tests/positional/test_registry.py checks they agree
with `rope.apply_rope` and `alibi.alibi_bias`).
"""

from seqmix.positional import alibi, rope
from seqmix.positional.base import PositionalComponent, register


@register("rope", paper="RoFormer: Enhanced Transformer with Rotary Position Embedding",
          year=2021, venue="arXiv", url="https://arxiv.org/abs/2104.09864", builtin=True)
class RoPE(PositionalComponent):
  """RoPE (rotate-half): q'_t = R(p_t θ) q_t, k'_s = R(p_s θ) k_s, θ_i = base^(−2i/R),
  so q'_t · k'_s depends on positions only through p_t − p_s (seqmix.positional.rope)."""
  ROTATES = True

  def rotate(self, q, k, positions):
    kw = dict(base=self.rope_base, fraction=self.rope_fraction)
    return rope.apply_rope(q, positions, **kw), rope.apply_rope(k, positions, **kw)

@register("alibi", paper="Train Short, Test Long: Attention with Linear Biases Enables Input "
          "Length Extrapolation", year=2022, venue="ICLR", url="https://arxiv.org/abs/2108.12409",
          builtin=True)
class ALiBi(PositionalComponent):
  """ALiBi: b_h(i, j) = −m_h |p_i − p_j|, m_h the paper's geometric slopes
  (seqmix.positional.alibi)."""
  BIAS = True

  def bias(self, q, k, q_pos, k_pos, *, k_idx=None, visible=None):
    del q, k, k_idx, visible
    return alibi.alibi_bias(alibi.alibi_slopes(self.num_heads), q_pos, k_pos)

@register("none", paper="(no positional encoding; see 'nope')", year=2017, venue="-",
          builtin=True)
class NoPositions(PositionalComponent):
  """No positional encoding: logits = Dh^−½ q·k; order enters only through the causal mask."""

__all__ = ["RoPE", "ALiBi", "NoPositions"]
