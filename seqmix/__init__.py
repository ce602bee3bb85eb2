"""seqmix: causal sequence mixers in JAX/Flax behind one interface.

    from seqmix import registry
    registry.names()                 # every mixer
    cls = registry.get("mha").cls    # its Linen class
"""

__version__ = "0.1.0"
