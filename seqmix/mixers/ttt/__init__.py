"""Test-time-training mixers: the hidden state is an inner model trained while reading (TTT)."""
