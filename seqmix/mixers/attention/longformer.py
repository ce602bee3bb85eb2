"""Longformer attention (Beltagy, Peters, Cohan, arXiv 2020, "Longformer: The Long-Document
Transformer"), causal (autoregressive) form: a dilated sliding window plus global tokens.

For a query at position i and a key at j ≤ i (same document; positions within the document),
window w, dilation d, the first g positions global:

    visible(i, j) = (i − j < w·d and (i − j) mod d = 0)   or   j < g
    o_i = Σ_visible softmax_j(q_i·k_j / sqrt(Dh)) v_j,     y = o W_o

so each query sees w window keys (itself, i − d, ..., i − (w−1)d) and every global token.
Global tokens attend to everything, which causally is every j ≤ i < g (already in the rule).
The rule is a boolean [T, S] mask given as a −1e30 additive bias to
`seqmix.ops.attention.attention` (`mha._pattern_attention`): dense, O(B·T·S) memory, so this
reproduces the pattern, not the paper's banded TVM kernel. Decoding keeps the full KV cache
(`mha`'s, max_len slots: the global tokens stay visible forever) and masks the new queries with
the same rule. Shapes: x [B,T,D] -> y [B,T,D].

Not reproduced: the separate projections Q_g, K_g, V_g of global attention, per-head or
per-layer window / dilation schedules, and the bidirectional (encoder) form.
"""

from seqmix import registry
from seqmix.mixers.attention.mha import MHA


@registry.register(
    "longformer", paper="Longformer: The Long-Document Transformer", year=2020, venue="arXiv",
    family="attention", op="attention.attention (pattern mask as bias)",
    parents=("mha", "sparse_transformer"), constant_state=False,
    test_kwargs={"num_heads": 4, "num_kv_heads": 2, "attention_window": 3, "dilation": 2,
                 "num_global": 2},
    url="https://arxiv.org/abs/2004.05150")
class Longformer(MHA):
  """Dilated sliding window + global first tokens (module docstring); every MHA field (its
  `window`, if set, further limits the keys to the last `window` tokens).

  attention_window: w >= 1 keys in the (dilated) window, the query's own included.
  dilation: d >= 1 (1: a plain sliding window).
  num_global: g >= 0 global positions at the start of each document.
  """
  attention_window: int = 512
  dilation: int = 1
  num_global: int = 1

  def _dims(self):
    for name, low in (("attention_window", 1), ("dilation", 1), ("num_global", 0)):
      if getattr(self, name) < low:
        raise ValueError(f"longformer: {name}={getattr(self, name)} must be >= {low}.")
    return super()._dims()

  def _patterns(self, q_pos, k_pos):
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]        # [b, 1, t, 1], [b, 1, 1, s]
    d = qp - kp
    win = (d < self.attention_window * self.dilation) & (d % self.dilation == 0)
    return (win | (kp < self.num_global),)                           # [b, 1, t, s]
