"""xLSTM[7:1] (Beck et al., "xLSTM: Extended Long Short-Term Memory", NeurIPS 2024): the layer
pattern of seven mLSTM blocks to one sLSTM block, repeated over the depth.

    mixer="xlstm", n_layers=24 -> mlstm ×7, slstm, mlstm ×7, slstm, mlstm ×7, slstm

The pattern only names the registered `mlstm` and `slstm` mixers. Deviations: the paper's
mLSTM block is a pre-up-projection block with no separate MLP while its sLSTM block carries a
gated MLP (factor 4/3); a seqmix pattern gives every layer the model's one `mlp` choice. The
paper places the sLSTM blocks at chosen depths of each model; here it is the last of every
eight layers.
"""

from seqmix import registry
from seqmix.mixers.linear import mlstm  # noqa: F401  (registers "mlstm" before the pattern)
from seqmix.mixers.rnn import slstm  # noqa: F401  (registers "slstm")

PATTERN = ("mlstm",) * 7 + ("slstm",)

registry.register_pattern(
    "xlstm", PATTERN, paper="xLSTM: Extended Long Short-Term Memory", year=2024,
    venue="NeurIPS", op="mlstm.mlstm, slstm.slstm", parents=("mlstm", "slstm"),
    url="https://arxiv.org/abs/2405.04517")
