"""Logical axis names every parameter and activation is annotated with.

Modules name only these logical axes (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); the mapping to mesh axes (`data`, `fsdp`, `tensor`,
`sequence`) is data in the config (`DEFAULT_RULES` is the default).
"""

import flax.linen as nn

BATCH = "batch"
SEQ = "seq"
EMBED = "embed"      # model width D
HEADS = "heads"      # attention / recurrence heads
KV = "kv"            # per-head key/value dim
MLP = "mlp"          # MLP hidden width
VOCAB = "vocab"
STATE = "state"      # SSM state size N, feature-map sizes
CONV = "conv"        # convolution kernel taps
NONE = None          # replicated

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    (SEQ, "sequence"),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (KV, None),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (STATE, None),
    (CONV, None),
)


def param(init, *names):
  """`init` wrapped with logical axis names, one per dimension of the parameter."""
  return nn.with_logical_partitioning(init, names)
