"""Pallas kernels for `seqmix.ops.linear_attention.gla` (reached only through seqmix.ops)."""
