"""Dual Chunk Attention, DCA (An et al., ICML 2024, "Training-Free Long-Context Scaling of
Large Language Models", ChunkLlama): keys keep their position within a chunk; a query uses
one of three position maps depending on the key's chunk, so no relative distance exceeds
what the model saw in training.

Chunk length s, local window w (w < s), chunk of position p: c(p) = ⌊p/s⌋. Keys sit at
p_k = j mod s. For a query at i and a key at j ≤ i (same document):

    intra  c(j) = c(i):      query at i mod s                  (distance i − j, exact)
    succ   c(j) = c(i) − 1:  query at s + min(i mod s, w)
    inter  c(j) <= c(i) − 2: query at s + w
    logit = q_i R(p_q) · k_j R(j mod s) / sqrt(Dh),  o_i = Σ_j softmax_j(logit_ij) v_j

So the largest distance is s + w − 0 = s + w: ChunkLlama sets s + w = 3/4 of the pretraining
length L and w = L/16 (this follows its released code, whose successive-chunk and inter-chunk
query positions clamp at s + w; the paper writes the inter position as L − 1). The three parts
are `blockwise_attention` calls over disjoint key sets merged by log-sum-exp
(`seqmix.mixers.attention.remapped`). Decoding caches each key rotated once (at j mod s).
Shapes: x [B,T,D] -> y [B,T,D].

Not reproduced: the training-free evaluation on pretrained Llama 2 (and the flash-attention
chunk slicing of the reference code); seqmix provides the mechanism (it also trains).
"""

import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.attention.remapped import RemappedAttention


@registry.register(
    "dca", paper="Training-Free Long-Context Scaling of Large Language Models (ChunkLlama)",
    year=2024, venue="ICML", family="attention", op="attention.blockwise_attention x3 + lse merge",
    parents=("mha",), constant_state=False,
    test_kwargs={"num_heads": 4, "num_kv_heads": 2, "chunk_len": 4, "local_window": 2},
    url="https://arxiv.org/abs/2402.17463")
class DCA(RemappedAttention):
  """Dual chunk attention (module docstring); every MHA field except `window`.

  chunk_len: s >= 1, the chunk length (ChunkLlama: 3/4 L − L/16 for pretraining length L).
  local_window: w, 0 <= w < s: successive-chunk queries keep exact offsets up to w.
  """
  chunk_len: int = 2816
  local_window: int = 256

  def _check(self):
    if self.chunk_len < 1:
      raise ValueError(f"DCA: chunk_len={self.chunk_len} must be >= 1.")
    if not 0 <= self.local_window < self.chunk_len:
      raise ValueError(f"DCA: local_window={self.local_window} must be in [0, chunk_len="
                       f"{self.chunk_len}); ChunkLlama uses L/16 with chunk_len = 3L/4 − L/16.")
    return super()._check()

  def key_positions(self, pos):
    return (pos % self.chunk_len,)

  def parts(self, q_pos, k_pos):
    s, w = self.chunk_len, self.local_window
    gap = q_pos[:, :, None] // s - k_pos[:, None, :] // s               # [b, t, s] chunk gap
    local = q_pos % s
    return ((local, 0, gap == 0), (s + jnp.minimum(local, w), 0, gap == 1),
            (jnp.full_like(q_pos, s + w), 0, gap >= 2))
