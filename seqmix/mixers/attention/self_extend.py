"""Self-Extend (Jin et al., ICML 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window
Without Tuning"): exact RoPE positions inside a neighbour window, grouped (floor-divided)
positions beyond it, merged into one softmax.

For a query at position i and a key at j ≤ i (same document), with group size G and
neighbour window W:

    i − j <  W:  logit = q_i R(i) · k_j R(j) / sqrt(Dh)                   (exact, distance i − j)
    i − j >= W:  logit = q_i R(⌊i/G⌋ + W − ⌊W/G⌋) · k_j R(⌊j/G⌋) / sqrt(Dh)
    o_i = Σ_j softmax_j(logit_ij) v_j

R(p) is RoPE at position p; the shift W − ⌊W/G⌋ makes the grouped distance continue the
neighbour one at the window edge (distance W maps to W − ⌊W/G⌋ + ⌊i/G⌋ − ⌊j/G⌋ ≈ W). The
largest distance a model trained at L then sees is about L₀ = W + (L − W)/G... i.e. a context
of roughly (L − W)·G + W. The two parts are two `blockwise_attention` calls over disjoint key
sets merged by log-sum-exp (`seqmix.mixers.attention.remapped`). Decoding caches each key
rotated twice (at j and at ⌊j/G⌋). Shapes: x [B,T,D] -> y [B,T,D].

Not reproduced: the paper applies this to pretrained Llama/Mistral models without tuning;
seqmix provides the mechanism (and it also trains).
"""

from seqmix import registry
from seqmix.mixers.attention.remapped import RemappedAttention


@registry.register(
    "self_extend", paper="LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning",
    year=2024, venue="ICML", family="attention", op="attention.blockwise_attention x2 + lse merge",
    parents=("mha",), constant_state=False,
    test_kwargs={"num_heads": 4, "num_kv_heads": 2, "group_size": 3, "neighbor_window": 4},
    url="https://arxiv.org/abs/2401.01325")
class SelfExtend(RemappedAttention):
  """Self-Extend attention (module docstring); every MHA field except `window`.

  group_size: G >= 1, the floor-division of far positions (G = 1: plain RoPE attention).
  neighbor_window: W >= 1, keys at distance < W keep their exact positions.
  """
  group_size: int = 4
  neighbor_window: int = 512

  def _check(self):
    if self.group_size < 1:
      raise ValueError(f"SelfExtend: group_size={self.group_size} must be >= 1.")
    if self.neighbor_window < 1:
      raise ValueError(f"SelfExtend: neighbor_window={self.neighbor_window} must be >= 1 "
                       "(keys a query sees with exact positions, itself included).")
    return super()._check()

  def key_positions(self, pos):
    return (pos, pos // self.group_size)

  def parts(self, q_pos, k_pos):
    g, w = self.group_size, self.neighbor_window
    near = (q_pos[:, :, None] - k_pos[:, None, :]) < w                   # [b, t, s]
    grouped_q = q_pos // g + (w - w // g)
    return ((q_pos, 0, near), (grouped_q, 1, ~near))
