"""Sparse Transformer (Child, Gray, Radford, Sutskever, arXiv 2019, "Generating Long Sequences
with Sparse Transformers"): causal softmax attention restricted to a factorised pattern, in its
merged form (every head attends to the union A⁽¹⁾ ∪ A⁽²⁾ of the two factors).

For a query at position i and a key at j ≤ i (same document; positions within the document):

    strided (stride l):       A⁽¹⁾ = {j : i − j < l},            A⁽²⁾ = {j : (i − j) mod l = 0}
    fixed (block l, c cells): A⁽¹⁾ = {j : ⌊j/l⌋ = ⌊i/l⌋},        A⁽²⁾ = {j : j mod l ≥ l − c}
    o_i = Σ_{j ∈ A⁽¹⁾∪A⁽²⁾} softmax_j(q_i·k_j / sqrt(Dh)) v_j,     y = o W_o

(q, k with RoPE by default, as `mha`). The pattern is a boolean [T, S] mask turned into a
−1e30 additive bias of `seqmix.ops.attention.attention` (`mha._pattern_attention`): dense,
O(B·T·S) memory and O(T·S) compute, so it reproduces the pattern, not the paper's
O(T·sqrt(T)) block-sparse kernels. Decoding keeps the full KV cache (`mha`'s, max_len slots)
and masks the new queries with the same rule. Shapes: x [B,T,D] -> y [B,T,D].

Not reproduced: the block-sparse GPU kernels, the interleaved form (factor A⁽¹⁾ and A⁽²⁾ on
alternating layers or heads), recomputation and the paper's initialisation.
"""

import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.attention.mha import MHA

PATTERNS = ("strided", "fixed")


@registry.register(
    "sparse_transformer", paper="Generating Long Sequences with Sparse Transformers", year=2019,
    venue="arXiv", family="attention", op="attention.attention (pattern mask as bias)",
    parents=("mha",), constant_state=False,
    test_kwargs={"num_heads": 4, "num_kv_heads": 2, "pattern": "strided", "stride": 3},
    url="https://arxiv.org/abs/1904.10509")
class SparseTransformer(MHA):
  """Strided or fixed factorised sparse attention (module docstring); every MHA field.

  pattern: "strided" | "fixed".
  stride: l >= 1, the stride (strided) or block length (fixed); the paper uses 128.
  num_summary: c in [1, stride], the summary cells at the end of each block (fixed only; the
    paper uses 8, 16 or 32).
  """
  pattern: str = "strided"
  stride: int = 128
  num_summary: int = 8

  def _dims(self):
    if self.pattern not in PATTERNS:
      raise ValueError(f"sparse_transformer: pattern={self.pattern!r} is not one of "
                       f"{PATTERNS}.")
    if self.stride < 1:
      raise ValueError(f"sparse_transformer: stride={self.stride} must be >= 1.")
    if self.pattern == "fixed" and not 1 <= self.num_summary <= self.stride:
      raise ValueError(f"sparse_transformer: num_summary={self.num_summary} must be in "
                       f"[1, stride={self.stride}] for pattern='fixed'.")
    return super()._dims()

  def _patterns(self, q_pos, k_pos):
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]        # [b, 1, t, 1], [b, 1, 1, s]
    l = self.stride
    if self.pattern == "strided":
      d = qp - kp
      return ((d < l) | (d % l == 0),)                               # [b, 1, t, s]
    return ((qp // l == kp // l) | (kp % l >= l - self.num_summary),)
