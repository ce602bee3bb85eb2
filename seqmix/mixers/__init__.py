"""Mixers, one file per architecture; see `seqmix.registry`."""
