"""Pallas kernels for `seqmix.ops.linear_attention.rwkv6` (reached only through seqmix.ops)."""
