"""Mamba-2-Hybrid (Waleffe et al., "An Empirical Study of Mamba-based Language Models", arXiv
2024): Mamba-2 layers with about 8% self-attention layers spread evenly over the depth, and
MLPs.

The paper's 8B model has 56 layers: 24 Mamba-2, 4 self-attention and 28 MLP layers (43% / 7% /
50%), placed by Megatron-LM's allocation from a target attention ratio of 0.08. A seqmix block
is a mixer layer followed by an MLP layer, so that model is 28 seqmix blocks (mlp="swiglu"),
4 of whose mixers are attention. For a model of n_layers blocks the placement rule is:

    n_attn = max(1, round(0.08 · 2 · n_layers))       (0.08 of the paper's 2·n_layers layers;
                                                        at least one, so a shallow model is
                                                        still a hybrid)
    the n_layers − n_attn Mamba-2 mixers are cut into n_attn + 1 equal sections of
    ℓ = (n_layers − n_attn) / (n_attn + 1); walking the layers with a budget x = ℓ, a layer is
    attention when x < 0.5 (then x += ℓ), else Mamba-2 (x −= 1).

This is Megatron-LM's rule (attention evenly spaced, the stack starting and ending with Mamba)
applied to the mixer layers; at n_layers = 28 it gives 4 attention mixers at blocks 5, 11, 16,
22 (0-based). Megatron applies it to the 56 layers and then spreads the MLPs between the Mamba
layers, so the paper's layers are not strictly alternating mixer / MLP as seqmix's blocks are:
that part is approximated. The pattern has to be the whole spec (`mixer="mamba2_hybrid"`): it
places layers by the model's depth.

The attention member is `jamba_attention`, the configuration this model uses too: grouped-query
attention (32 query heads over 8 key/value groups) with no position embedding (the paper's
hybrid has none; the Mamba-2 layers carry position). Configure it through
`mixer_kwargs["jamba_attention"]`.
"""

from seqmix import registry
from seqmix.mixers.hybrid import jamba  # noqa: F401  (registers "jamba_attention")
from seqmix.mixers.linear import mamba2  # noqa: F401  (registers "mamba2")

PAPER = "An Empirical Study of Mamba-based Language Models"
URL = "https://arxiv.org/abs/2406.07887"
ATTENTION_RATIO = 0.08  # of the paper's layers (mixers and MLPs), 2 per seqmix block
MAMBA, ATTENTION = "mamba2", "jamba_attention"


def attention_count(n_layers: int) -> int:
  """How many of n_layers blocks get attention: max(1, round(0.08 · 2 · n_layers))."""
  if n_layers < 1:
    raise ValueError(f"mamba2_hybrid: n_layers={n_layers} must be >= 1.")
  return min(n_layers, max(1, round(ATTENTION_RATIO * 2 * n_layers)))


def layout(n_layers: int) -> tuple[str, ...]:
  """One mixer name per block: Megatron-LM's even spacing of the attention layers."""
  n_attn = attention_count(n_layers)
  section = (n_layers - n_attn) / (n_attn + 1)
  out, x = [], section
  for _ in range(n_layers):
    if x < 0.5:
      out.append(ATTENTION)
      x += section
    else:
      out.append(MAMBA)
      x -= 1
  return tuple(out)


registry.register_pattern(
    "mamba2_hybrid", layout(7), paper=PAPER, year=2024, venue="arXiv",
    op="linear_attention.gla + attention.attention", parents=("mamba2", "jamba_attention"),
    url=URL, layout=layout)
