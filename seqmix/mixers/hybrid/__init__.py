"""Hybrid layer patterns (Samba, Jamba, Mamba-2-Hybrid, Zamba): registry patterns over
registered mixers, plus the configured attention members they need."""
