"""LongNet dilated attention (Ding et al., arXiv 2023, "LongNet: Scaling Transformers to
1,000,000,000 Tokens"), causal form: several (segment length w_k, dilation r_k) patterns, each
a softmax, merged weighted by their softmax denominators.

For a query at position i, a key at j ≤ i (same document; positions within the document) and
query head h, pattern k keeps the rows and columns of each segment of w_k positions whose
offset in the segment is ≡ h mod r_k (LongNet's per-head offsets; offset 0 for every head
with head_offsets=False):

    A_k^h(i) = {j : ⌊j/w_k⌋ = ⌊i/w_k⌋, (j mod w_k) mod r_k = s_h, (i mod w_k) mod r_k = s_h},
    s_h = h mod r_k
    o_k = Σ_{j ∈ A_k} e^{l_ij} v_j / s_k,   s_k = Σ_{j ∈ A_k} e^{l_ij},   l_ij = q_i·k_j / sqrt(Dh)
    o_i = Σ_k s_k o_k / Σ_k s_k,            y = o W_o

(the paper's merge "weighted by the denominators of the attention softmax"; a key in two
patterns counts twice; a query not on the grid of pattern k gets s_k = 0 from it). Each
pattern is a boolean [H, T, S] mask given as a −1e30 bias to
`seqmix.ops.attention.blockwise_attention`, whose (o, lse) pairs merge exactly with
`merge_partials` (s_k = e^{lse_k}) in `mha._pattern_attention`: dense, O(K·B·H·T·S) memory,
not the paper's gather-into-dense-segments kernel. Decoding keeps the full KV cache (`mha`'s,
max_len slots) and masks the new queries with the same rules. Shapes: x [B,T,D] -> y [B,T,D].

dilation_rates must contain 1, so every query sees at least itself (a query off every grid
would have no keys). Not reproduced: the distributed (sequence-parallel) algorithm and the
paper's geometric schedules beyond what the two tuples give.
"""

import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.attention.mha import MHA


@registry.register(
    "longnet", paper="LongNet: Scaling Transformers to 1,000,000,000 Tokens", year=2023,
    venue="arXiv", family="attention",
    op="attention.blockwise_attention per (segment, dilation) + merge_partials",
    parents=("mha", "sparse_transformer"), constant_state=False,
    test_kwargs={"num_heads": 4, "num_kv_heads": 2, "segment_lengths": (2, 32),
                 "dilation_rates": (1, 2)},
    url="https://arxiv.org/abs/2307.02486")
class LongNet(MHA):
  """Dilated attention over (segment, dilation) pairs merged by lse (module docstring);
  every MHA field.

  segment_lengths: (w_1, ..., w_K), each >= 1 (the paper: 2048 ... 32768, geometric).
  dilation_rates: (r_1, ..., r_K), each >= 1, as many as segment_lengths, one of them 1
    (the paper: 1, 2, 4, 6, 12).
  head_offsets: head h uses offset h mod r_k (the paper); False: offset 0 for every head.
  """
  segment_lengths: tuple = (2048, 4096, 8192, 16384, 32768)
  dilation_rates: tuple = (1, 2, 4, 6, 12)
  head_offsets: bool = True

  def _dims(self):
    ws, rs = tuple(self.segment_lengths), tuple(self.dilation_rates)
    if not ws or len(ws) != len(rs):
      raise ValueError(f"longnet: segment_lengths={ws} and dilation_rates={rs} must be "
                       "non-empty and of one length (one (w, r) pair per pattern).")
    for name, vals in (("segment_lengths", ws), ("dilation_rates", rs)):
      if any(int(u) < 1 for u in vals):
        raise ValueError(f"longnet: {name}={vals} must all be >= 1.")
    if 1 not in rs:
      raise ValueError(f"longnet: dilation_rates={rs} must contain 1 (a pattern every query "
                       "is on, so each query sees at least itself); add (w, 1).")
    return super()._dims()

  def _patterns(self, q_pos, k_pos):
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]        # [b, 1, t, 1], [b, 1, 1, s]
    heads = jnp.arange(self.num_heads)[None, :, None, None]          # [1, h, 1, 1]
    out = []
    for w, r in zip(self.segment_lengths, self.dilation_rates):
      off = heads % r if self.head_offsets else 0
      out.append((qp // w == kp // w) & ((qp % w) % r == off) & ((kp % w) % r == off))
    return tuple(out)                                                # each [b, h|1, t, s]
