"""Memory-augmented mixers: state carried across segments (Transformer-XL, Infini-attention, ...)."""
