"""Segment recurrence: run a model or a mixer over fixed-length segments, carrying a memory.

    y, cache = run_segments(model, {"params": params}, tokens, segment_len=128, tbptt=2)

The sequence x [B, T, ...] (T = N · L, L = segment_len) is cut into N segments x^(1..N) of L
tokens, and the module runs on one segment at a time with the memory carried between them:

    (y^(n), m_n) = module(x^(n), cache=m_{n-1}),   m_0 = init_cache(B, max_len)
    m_{n-1} <- stop_gradient(m_{n-1})   before segment n when n > 0 and n % tbptt == 0

The memory m is the module's own decoding cache (for a LanguageModel: its tuple of
BlockCache; for a mixer: its typed cache, e.g. `MHACache`, or the `transformer_xl` /
`infini_attention` caches), so any mixer that follows the protocol runs segment-recurrently
with no extra code: whatever the cache keeps (a KV cache, a ring of the last tokens, a
recurrent state, a compressive memory) is the memory. Segment-by-segment evaluation is then
exactly prefill-by-prefill decoding (the protocol's split prefill), which is what the tests
check.

Truncated backpropagation through time (`tbptt`): None (or 0) lets gradients flow through
the memory across all N segments (full BPTT); k >= 1 stops them at every k-th boundary, so a
loss on segment n reaches the inputs and the memory-producing computation of segments
k·floor(n/k) .. n only (k = 1: each segment on its own; its memory is a constant). The
forward values never depend on `tbptt`.

Packed documents: `segment_ids` [B, T] (and the caller's `positions`, restarting at 0 in
every document) are cut with the segments; the mixers' caches keep the last segment id, so a
document boundary inside a segment, or between two segments, resets the memory exactly as
in decoding (DESIGN.md: state never crosses a document boundary).

The loop is a `lax.scan` over segments (one compiled segment step), so the memory's
structure must be the same after every segment, which a protocol cache is. Memory use for
gradients is that of the whole unrolled scan; wrap the module in `nn.remat` for long runs.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def check_segmentation(seq_len: int, segment_len: int, tbptt: int | None) -> int:
  """The number of segments N = seq_len / segment_len, after checking the arguments."""
  if not isinstance(segment_len, int) or segment_len < 1:
    raise ValueError(f"segment_len={segment_len!r} must be a positive int (tokens per "
                     f"segment).")
  if seq_len % segment_len:
    lo = seq_len // segment_len * segment_len
    raise ValueError(
        f"sequence length T={seq_len} is not a multiple of segment_len={segment_len}; pad the "
        f"sequence to {lo + segment_len} tokens, cut it to {lo}, or choose a segment_len that "
        f"divides {seq_len}.")
  if tbptt is not None and (not isinstance(tbptt, int) or tbptt < 0):
    raise ValueError(f"tbptt={tbptt!r} must be None or 0 (full backpropagation through every "
                     f"segment) or a positive int k (stop gradients every k segments).")
  return seq_len // segment_len


def truncate(cache, segment_index, tbptt: int | None):
  """The carried memory before segment `segment_index` (traced int): stop-gradient at every
  `tbptt`-th boundary, unchanged otherwise (values are identical either way)."""
  if not tbptt:
    return cache
  cut = (segment_index > 0) & (segment_index % tbptt == 0)
  return jax.tree.map(lambda c: jnp.where(cut, lax.stop_gradient(c), c), cache)


def _split(x, n):
  """[B, T, ...] -> [N, B, L, ...]."""
  if x is None:
    return None
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape((b, n, t // n) + x.shape[2:]), 1, 0)


def _merge(y):
  """[N, B, L, ...] -> [B, N·L, ...]."""
  y = jnp.moveaxis(y, 0, 1)
  return y.reshape((y.shape[0], y.shape[1] * y.shape[2]) + y.shape[3:])


def run_segments(module, variables, inputs, *, segment_len: int, cache: Any = None,
                 segment_ids=None, positions=None, tbptt: int | None = None,
                 max_len: int | None = None, **apply_kwargs):
  """Run `module` over `inputs` one segment of `segment_len` tokens at a time.

  module: a LanguageModel or a mixer (anything whose `apply(variables, x, cache=...,
    segment_ids=..., positions=..., **apply_kwargs)` returns (y, new_cache) and which has
    `init_cache(batch_size, max_len)`).
  variables: {"params": ...}.
  inputs: [B, T] tokens (a model) or [B, T, D] activations (a mixer); T a multiple of
    segment_len.
  cache: the memory to start from (None: `module.init_cache(B, max_len or T)`; size it for
    the whole stream when the cache is a KV cache without a window).
  segment_ids, positions: [B, T] int or None (packed documents; see the module docstring).
  tbptt: None / 0 (full BPTT) or k >= 1 (stop gradients through the memory every k segments).
  Returns (y [B, T, ...], final memory).
  """
  b, t = inputs.shape[:2]
  n = check_segmentation(t, segment_len, tbptt)
  if cache is None:
    cache = module.init_cache(b, max_len or t)

  def step(memory, xs):
    i, x, seg, pos = xs
    memory = truncate(memory, i, tbptt)
    y, memory = module.apply(variables, x, cache=memory, segment_ids=seg, positions=pos,
                             **apply_kwargs)
    if memory is None:
      raise ValueError(f"{type(module).__name__} returned no cache when given one; it does "
                       f"not follow the mixer protocol and cannot run segment-recurrently.")
    return memory, y

  xs = (jnp.arange(n), _split(inputs, n), _split(segment_ids, n), _split(positions, n))
  cache, ys = lax.scan(step, cache, xs)
  return _merge(ys), cache
