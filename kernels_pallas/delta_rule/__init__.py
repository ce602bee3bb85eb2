"""Pallas kernels for `seqmix.ops.delta_rule.delta_rule` (reached only through seqmix.ops)."""
