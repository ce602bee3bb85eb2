"""Language-modelling batches from a token sequence, as grain pipelines.

Training (`train_windows`): nanoGPT's `get_batch` — each row is a window at a random offset `a`,
`inputs = x[a : a+T]`, `targets = x[a+1 : a+T+1]` — as an infinite `grain.MapDataset`. Row `i`
of the run draws its offset from a generator seeded by `(seed, i)`, so the stream is a pure
function of the seed: an iterator's `get_state()` / `set_state()` resumes it exactly, and
sharding by JAX process (`process_index::process_count` over rows) gives disjoint rows whose
union is the single-process stream.

Validation (`validation_windows`): the split cut into consecutive non-overlapping windows, every
target token of the split scored exactly once (`N - 1` targets for `N` tokens); the last window
is padded with `targets = -100`, and the last batch with all-`-100` rows so shapes stay fixed.
The mean of the per-token loss over `targets != -100` is the exact validation loss.

Sources with several documents (a prepared token store) add `segment_ids` and `positions`
(`[B,T]`, ids 1.. in each row, 0 on padding; positions restart at each segment) and never score a
target across a document boundary.

Batches: dicts of int32 numpy arrays `inputs`, `targets` `[B,T]` (+ `segment_ids`, `positions`).
`batch_size` everywhere is the GLOBAL batch; each process gets `batch_size // process_count` rows.
"""

from __future__ import annotations

import math
import sys
from typing import Protocol

import grain
import numpy as np

from seqmix.data.common import IGNORE, default_read_options, process_rows
from seqmix.data.packing import positions_from_segment_ids


class TokenSource(Protocol):
  """A 1-D token sequence read by slices (an in-memory array or a tensorstore array)."""

  document_starts: np.ndarray | None  # [D] sorted offsets of document starts, or None (one doc)

  def __len__(self) -> int: ...

  def read(self, start: int, stop: int) -> np.ndarray: ...  # int32 [stop - start]


class ArrayTokens:
  """An in-memory `TokenSource` over a numpy array `[N]`."""

  def __init__(self, tokens, document_starts=None):
    self.tokens = np.asarray(tokens)
    if self.tokens.ndim != 1:
      raise ValueError(f"Expected a 1-D token array, got shape {self.tokens.shape}.")
    self.document_starts = _normalise_starts(document_starts, len(self.tokens))

  def __len__(self) -> int:
    return len(self.tokens)

  def read(self, start: int, stop: int) -> np.ndarray:
    return self.tokens[start:stop].astype(np.int32)


class SourceView:
  """Tokens `[start, stop)` of another source (a train or validation split of it)."""

  def __init__(self, parent: TokenSource, start: int, stop: int):
    if not 0 <= start <= stop <= len(parent):
      raise ValueError(f"View [{start}, {stop}) outside a source of {len(parent)} tokens.")
    self.parent, self.start, self.stop = parent, start, stop
    starts = parent.document_starts
    if starts is not None:
      # The view's first token starts a (possibly partial) document.
      inside = starts[(starts > start) & (starts < stop)] - start
      starts = np.concatenate([[0], inside]).astype(np.int64)
    self.document_starts = starts

  def __len__(self) -> int:
    return self.stop - self.start

  def read(self, start: int, stop: int) -> np.ndarray:
    return self.parent.read(self.start + start, self.start + min(stop, len(self)))


def as_source(tokens) -> TokenSource:
  """numpy array / list -> ArrayTokens; anything with `read` and `__len__` passes through."""
  if hasattr(tokens, "read") and hasattr(tokens, "__len__"):
    return tokens
  return ArrayTokens(tokens)


def split_source(source, val_fraction: float = 0.1) -> tuple[TokenSource, TokenSource]:
  """nanoGPT's split of a source: first `int((1-f)·N)` tokens train, the rest validate."""
  source = as_source(source)
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  n = int(len(source) * (1.0 - val_fraction))
  return SourceView(source, 0, n), SourceView(source, n, len(source))


def has_segments(source: TokenSource) -> bool:
  starts = source.document_starts
  return starts is not None and len(starts) > 1


def window(source: TokenSource, start: int, seq_len: int) -> dict[str, np.ndarray]:
  """One row: `inputs = x[start:start+T]`, `targets = x[start+1:start+T+1]`, int32 `[T]`.

  Past the end of the source, inputs are 0 and targets IGNORE. With documents, targets that
  would cross into the next document are IGNORE and `segment_ids`/`positions` are added.
  """
  tok = source.read(start, min(start + seq_len + 1, len(source)))  # [m], m <= T + 1
  m = len(tok)
  inputs = np.zeros(seq_len, np.int32)
  targets = np.full(seq_len, IGNORE, np.int32)
  n_in = min(m, seq_len)
  inputs[:n_in] = tok[:n_in]
  targets[: m - 1] = tok[1:m]
  row = {"inputs": inputs, "targets": targets}
  if has_segments(source):
    doc = np.searchsorted(source.document_starts, start + np.arange(m), side="right") - 1  # [m]
    crosses = doc[1:] != doc[:-1]  # [m - 1]: target j lies in the next document
    targets[: m - 1][crosses] = IGNORE
    segment_ids = np.zeros(seq_len, np.int32)
    segment_ids[:n_in] = doc[:n_in] - doc[0] + 1
    row["segment_ids"] = segment_ids
    row["positions"] = positions_from_segment_ids(segment_ids)
  return row


class _RandomWindow(grain.transforms.RandomMap):
  """Row index -> window at an offset drawn uniformly from [0, N - T) (nanoGPT's get_batch)."""

  def __init__(self, source: TokenSource, seq_len: int):
    self.source, self.seq_len = source, seq_len
    self.num_offsets = len(source) - seq_len

  def random_map(self, index, rng: np.random.Generator):
    del index
    return window(self.source, int(rng.integers(0, self.num_offsets)), self.seq_len)


def train_windows(tokens, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
  """Infinite dataset of training batches of random windows (module docstring).

  Args:
    tokens: a TokenSource or an int array `[N]`, `N > seq_len`.
    seq_len: T.
    batch_size: global B; this process gets `B // process_count` rows per batch.
    seed: the whole stream is a function of it.
    process_index, process_count: default to jax.process_index() / jax.process_count().

  Returns:
    `grain.MapDataset` of batches (dict of int32 `[B/P, T]`); `iter(ds.to_iter_dataset())`
    gives a resumable iterator (see `train_iterator`).
  """
  source = as_source(tokens)
  if len(source) <= seq_len:
    raise ValueError(f"The training split has {len(source)} tokens; seq_len={seq_len} needs "
                     "more than seq_len tokens. Lower seq_len or use a bigger corpus.")
  p, count, rows = process_rows(batch_size, process_index, process_count)
  ds = grain.MapDataset.range(sys.maxsize)
  # Seeded per global row index BEFORE sharding: a row's window does not depend on the sharding.
  ds = ds.random_map(_RandomWindow(source, seq_len), seed=seed)
  ds = ds[p::count]
  return ds.batch(rows, drop_remainder=True)


def train_iterator(tokens, *, seq_len: int, batch_size: int, seed: int,
                   process_index: int | None = None, process_count: int | None = None,
                   read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """`train_windows(...)` as an iterator with `get_state()` / `set_state()` (JSON-able dicts)."""
  ds = train_windows(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
                     process_index=process_index, process_count=process_count)
  return iter(ds.to_iter_dataset(read_options or default_read_options()))


def validation_windows(tokens, *, seq_len: int, batch_size: int,
                       process_index: int | None = None,
                       process_count: int | None = None) -> grain.MapDataset:
  """Finite dataset of batches covering every target of the split exactly once.

  Window `w` starts at `w·T`; there are `ceil((N-1)/T)` windows, padded with all-IGNORE rows to a
  multiple of the global batch. Global batch `j` holds rows `[jB, (j+1)B)`; process `p` gets its
  contiguous block `[jB + p·B/P, jB + (p+1)·B/P)`, so all processes see the same number of
  batches.

  Returns:
    `grain.MapDataset` of batches (dict of int32 `[B/P, T]`).
  """
  source = as_source(tokens)
  if len(source) < 2:
    raise ValueError(f"The validation split has {len(source)} tokens; it needs at least 2.")
  p, _, rows = process_rows(batch_size, process_index, process_count)
  num_windows = math.ceil((len(source) - 1) / seq_len)
  num_batches = math.ceil(num_windows / batch_size)
  segments = has_segments(source)

  def row(local: int) -> dict[str, np.ndarray]:
    g = (local // rows) * batch_size + p * rows + local % rows  # global row index
    if g < num_windows:
      return window(source, g * seq_len, seq_len)
    pad = {"inputs": np.zeros(seq_len, np.int32), "targets": np.full(seq_len, IGNORE, np.int32)}
    if segments:
      pad["segment_ids"] = np.zeros(seq_len, np.int32)
      pad["positions"] = np.zeros(seq_len, np.int32)
    return pad

  return grain.MapDataset.range(num_batches * rows).map(row).batch(rows)


def validation_batches_fn(tokens, *, seq_len: int, batch_size: int,
                          process_index: int | None = None, process_count: int | None = None,
                          read_options: grain.ReadOptions | None = None):
  """A zero-argument function returning a fresh iterator over the whole validation split."""
  ds = validation_windows(tokens, seq_len=seq_len, batch_size=batch_size,
                          process_index=process_index, process_count=process_count)
  return lambda: iter(ds.to_iter_dataset(read_options or default_read_options()))


def _normalise_starts(starts, n: int) -> np.ndarray | None:
  if starts is None:
    return None
  starts = np.asarray(starts, np.int64)
  if starts.ndim != 1 or len(starts) == 0 or starts[0] != 0 or (np.diff(starts) < 0).any() or (
      starts[-1] > n):
    raise ValueError(f"document_starts must be sorted offsets beginning at 0 within [0, {n}], "
                     f"got {starts[:8]}...")
  return starts
