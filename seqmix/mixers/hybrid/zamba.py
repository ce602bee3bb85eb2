"""Zamba (Glorioso et al., "Zamba: A Compact 7B SSM Hybrid Model", arXiv 2024): a Mamba
backbone with ONE attention block whose weights are shared by all its applications, applied
after every six Mamba blocks.

    mixer="zamba", mlp="none", shared_mlp="gelu", n_layers=16 ->
      mamba, mamba, S, mamba ×5, S, mamba ×6, S          (S = shared:zamba_attention)

S is one LanguageModel block (`params["shared_zamba_attention"]`: pre-norm attention, then a
pre-norm MLP, residual adds) called at every S layer with the same parameters and a KV cache of
its own per application (`seqmix.models.lm`, "Shared blocks"). The placement follows the
released Zamba config (`layers_block_type`: two Mamba layers, a hybrid layer, then a hybrid
layer whenever (i − 3) mod 6 = 4 with attn_layer_period=6, attn_layer_offset=4; a hybrid layer
is the shared block followed by a Mamba layer), flattened into seqmix blocks and cut at
n_layers. Zamba's Mamba blocks have no MLP and its shared block has a GELU MLP: configure
mlp="none", shared_mlp="gelu" (any other pair works too).

`zamba_attention` is the `mha` mixer configured as Zamba's attention: 16 heads, one key/value
head per query head, no positional encoding (Zamba-1's attention has no RoPE; the Mamba layers
give position). Decoding keeps a full KV cache per application.

Not built (deviations from the paper, which would need per-application state in the block):
- the shared block's input is the residual stream alone; Zamba concatenates it with the
  original token embeddings (a 2·D input to the block's norm and attention);
- Zamba passes the shared block's output through a per-application (unshared) linear map and
  adds it to the residual stream before the next Mamba layer, and its shared block has no
  residual adds of its own; here the shared block is a seqmix pre-norm residual block.
"""

from seqmix import registry
from seqmix.mixers.attention.mha import MHA
from seqmix.mixers.ssm import mamba  # noqa: F401  (registers "mamba" before the pattern)

ZAMBA_PAPER = "Zamba: A Compact 7B SSM Hybrid Model"
ZAMBA_URL = "https://arxiv.org/abs/2405.16712"
SHARED = registry.SHARED_PREFIX + "zamba_attention"
PERIOD, OFFSET = 6, 4  # the released config's attn_layer_period, attn_layer_offset


@registry.register(
    "zamba_attention", paper=ZAMBA_PAPER, year=2024, venue="arXiv", family="attention",
    op="attention.attention", parents=("mha",), constant_state=False,
    test_kwargs={"num_heads": 4}, url=ZAMBA_URL, needs_positions=True, sequence_parallel=True)
class ZambaAttention(MHA):
  """Zamba's (shared) attention: causal MHA without positional encoding.  x [B,T,D] -> y.

      o_t = softmax_{s ≤ t}(Dh^-1/2 q_t·k_s) v_s,   y = o W_o

  Every field is `mha`'s; the defaults differ: num_heads=16, position="none".
  """
  num_heads: int = 16
  position: str = "none"


def layout(n_layers: int) -> tuple[str, ...]:
  """One name per seqmix block: Zamba's layers_block_type flattened (a hybrid layer -> the
  shared block, then a Mamba block), cut at n_layers."""
  if n_layers < 1:
    raise ValueError(f"zamba: n_layers={n_layers} must be >= 1.")
  out = ["mamba", "mamba", SHARED, "mamba"]
  i = 0
  while len(out) < n_layers:
    out.extend([SHARED, "mamba"] if i % PERIOD == OFFSET else ["mamba"])
    i += 1
  return tuple(out[:n_layers])


registry.register_pattern(
    "zamba", layout(9), paper=ZAMBA_PAPER, year=2024, venue="arXiv",
    op="ssm.selective_scan + attention.attention (one shared block)",
    parents=("mamba", "zamba_attention"), url=ZAMBA_URL, layout=layout)
