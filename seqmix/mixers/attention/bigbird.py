"""BigBird attention (Zaheer et al., NeurIPS 2020, "Big Bird: Transformers for Longer
Sequences"), causal form: sliding window + global first tokens + seeded random key blocks.

For a query at position i and a key at j ≤ i (same document; positions within the document),
window w, the first g positions global, blocks of b positions, r random blocks per query block:

    R(β) = {ρ_1(β), ..., ρ_r(β)},  ρ_m(β) = randint(fold_in(PRNGKey(seed), β), 0, β)  (β ≥ 1;
           R(0) = ∅): r blocks drawn, with replacement, among the blocks before query block β
    visible(i, j) = i − j < w   or   j < g   or   ⌊j/b⌋ ∈ R(⌊i/b⌋)
    o_i = Σ_visible softmax_j(q_i·k_j / sqrt(Dh)) v_j,     y = o W_o

The random blocks are a pure function of (seed, query block), so the same seed gives the same
pattern at any length, in the parallel form and when decoding, and they lie strictly before
the query's block (causal by construction, and also masked by causality). The rule is a
boolean [T, S] mask given as a −1e30 additive bias to `seqmix.ops.attention.attention`
(`mha._pattern_attention`): dense, O(B·T·S) memory, not the paper's blocked gather kernel.
Decoding keeps the full KV cache (`mha`'s, max_len slots: global and random keys lie anywhere
in the past). Shapes: x [B,T,D] -> y [B,T,D].

Not reproduced: the bidirectional (encoder) form and its global-token rows, block-level
window/global units (here window and global are counted in tokens), sampling without
replacement (duplicates simply merge), per-head / per-layer random patterns and the ETC
variant with extra global tokens.
"""

import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.attention.mha import MHA


def random_blocks(seed: int, num_random: int, q_block):
  """The random key blocks of each query block.  q_block int [...] -> int [..., r].

  Entry m of query block β is randint(fold_in(PRNGKey(seed), β), 0, β) (block m of r drawn
  with that key); −1 (no block) where β = 0.
  """
  key = jax.random.PRNGKey(seed)
  flat = q_block.reshape(-1).astype(jnp.int32)
  draw = jax.vmap(lambda beta: jax.random.randint(jax.random.fold_in(key, beta), (num_random,),
                                                  0, jnp.maximum(beta, 1)))(flat)
  draw = jnp.where(flat[:, None] >= 1, draw, -1)
  return draw.reshape(q_block.shape + (num_random,))


@registry.register(
    "bigbird", paper="Big Bird: Transformers for Longer Sequences", year=2020, venue="NeurIPS",
    family="attention", op="attention.attention (pattern mask as bias)",
    parents=("mha", "longformer"), constant_state=False,
    test_kwargs={"num_heads": 4, "num_kv_heads": 2, "attention_window": 3, "num_global": 1,
                 "block_size": 2, "num_random": 1},
    url="https://arxiv.org/abs/2007.14062")
class BigBird(MHA):
  """Window + global + seeded random blocks (module docstring); every MHA field.

  attention_window: w >= 1 tokens in the sliding window, the query's own included.
  num_global: g >= 0 global positions at the start of each document.
  block_size: b >= 1 positions per block (the paper uses 64).
  num_random: r >= 0 random key blocks per query block (the paper uses 3).
  seed: the integer seed of the random blocks (fixed per layer: give layers distinct seeds
    for distinct patterns).
  """
  attention_window: int = 192
  num_global: int = 64
  block_size: int = 64
  num_random: int = 3
  seed: int = 0

  def _dims(self):
    for name, low in (("attention_window", 1), ("num_global", 0), ("block_size", 1),
                      ("num_random", 0)):
      if getattr(self, name) < low:
        raise ValueError(f"bigbird: {name}={getattr(self, name)} must be >= {low}.")
    return super()._dims()

  def _patterns(self, q_pos, k_pos):
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]        # [b, 1, t, 1], [b, 1, 1, s]
    m = (qp - kp < self.attention_window) | (kp < self.num_global)
    if self.num_random:
      blocks = random_blocks(self.seed, self.num_random, q_pos // self.block_size)  # [b, t, r]
      kb = (k_pos // self.block_size)[:, None, None, :, None]        # [b, 1, 1, s, 1]
      m |= jnp.any(kb == blocks[:, None, :, None, :], axis=-1)       # [b, 1, t, s]
    return (m,)
