"""Dense token-mixing mixers (MLP-Mixer style): AFT, Synthesizer, gMLP, MetaFormer."""
