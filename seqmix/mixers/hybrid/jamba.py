"""Jamba (Lieber et al., "Jamba: A Hybrid Transformer-Mamba Language Model", arXiv 2024): the
layer pattern of one attention layer to seven Mamba layers, repeated over the depth.

    mixer="jamba", n_layers=16 -> [mamba ×4, jamba_attention, mamba ×3] × 2

The Jamba block has l = 8 layers at a:m = 1:7; the attention layer is the fifth of each eight
(layer i is attention when i mod 8 = 4: the released config's attn_layer_offset=4,
attn_layer_period=8). `jamba_attention` is the `mha` mixer configured as Jamba's attention:
grouped-query attention (32 query heads over 8 key/value heads) and no positional encoding at
all (the paper: the Mamba layers give the position information, and adding RoPE did not help);
decoding keeps a full KV cache.

Not built, and said so here rather than approximated:
- MoE. Jamba replaces the MLP of every other layer (e = 2) by a mixture of 16 experts with
  top-2 routing. The LanguageModel has no MoE MLP (its `mlp` choices are swiglu, gelu,
  rwkv_channel_mix) and one MLP choice for all blocks, so a seqmix Jamba gives every layer the
  model's `mlp`: this entry is the mixer pattern only.
- The RMSNorms Jamba adds inside its Mamba layers (on Δ, B and C, for stability at scale): the
  members are the plain seqmix `mamba`.
"""

from seqmix import registry
from seqmix.mixers.attention.mha import MHA
from seqmix.mixers.ssm import mamba  # noqa: F401  (registers "mamba" before the pattern)

JAMBA_PAPER = "Jamba: A Hybrid Transformer-Mamba Language Model"
JAMBA_URL = "https://arxiv.org/abs/2403.19887"
PERIOD, ATTENTION_OFFSET = 8, 4
PATTERN = tuple("jamba_attention" if i == ATTENTION_OFFSET else "mamba" for i in range(PERIOD))


@registry.register(
    "jamba_attention", paper=JAMBA_PAPER, year=2024, venue="arXiv", family="attention",
    op="attention.attention", parents=("mha",), constant_state=False,
    test_kwargs={"num_heads": 4, "num_kv_heads": 2}, url=JAMBA_URL, needs_positions=True,
    sequence_parallel=True)
class JambaAttention(MHA):
  """Jamba's attention layer: causal GQA without positional encoding.  x [B,T,D] -> y [B,T,D].

      o_t = softmax_{s ≤ t}(Dh^-1/2 q_t·k_s) v_s  (query head i reads kv head i // (H/G)),
      y = o W_o

  Every field is `mha`'s; the defaults differ: num_heads=32, num_kv_heads=8, position="none".
  Alone it has no position information (registry needs_positions); in the jamba pattern the
  Mamba layers provide it.
  """
  num_heads: int = 32
  num_kv_heads: int | None = 8
  position: str = "none"


registry.register_pattern(
    "jamba", PATTERN, paper=JAMBA_PAPER, year=2024, venue="arXiv",
    op="ssm.selective_scan + attention.attention", parents=("mamba", "jamba_attention"),
    url=JAMBA_URL)
