"""Long and short convolution mixers (Hyena, TNN, M2, ...)."""
