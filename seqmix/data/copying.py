"""The lag-k copy task: predict the token seen k steps earlier.

Inputs are i.i.d. uniform tokens in [0, V); `targets[t] = inputs[t - k]` for t >= k and -100
(not scored) for t < k. A model without token mixing cannot beat chance (1/V); one that can
look k tokens back solves it exactly. It is the mixer-protocol's learning check (DESIGN.md).

Every row is a function of (seed, global row index) only, so batches are deterministic given
the seed, independent of how rows are sharded over processes, and resumable by index.

    batch = copy_batch(seed=0, step=0, batch_size=32, seq_len=32, vocab_size=16, lag=2)
    ds = make_datasets({"name": "copy", "vocab_size": 16, "lag": 2}, seq_len=32,
                       batch_size=32, seed=0)   # via seqmix.data.pipeline.make_datasets
"""

from __future__ import annotations

import sys

import grain
import numpy as np

from seqmix.data.common import IGNORE, default_read_options, process_rows

_VAL_SEED_OFFSET = 10_000  # validation rows come from a different stream than training rows


def _check(seq_len: int, vocab_size: int, lag: int):
  if lag < 1:
    raise ValueError(f"lag={lag} must be >= 1 (lag 0 is the identity, not a copy task).")
  if seq_len <= lag:
    raise ValueError(f"seq_len={seq_len} must exceed lag={lag}, else nothing is scored.")
  if vocab_size < 2:
    raise ValueError(f"vocab_size={vocab_size} must be >= 2.")


def copy_example(seed: int, index: int, *, seq_len: int, vocab_size: int, lag: int = 2):
  """Row `index` of the stream `seed`: {"inputs": [T] int32, "targets": [T] int32}."""
  _check(seq_len, vocab_size, lag)
  rng = np.random.default_rng([int(seed), int(index)])
  inputs = rng.integers(0, vocab_size, size=seq_len, dtype=np.int32)
  targets = np.full(seq_len, IGNORE, np.int32)
  targets[lag:] = inputs[:-lag]
  return {"inputs": inputs, "targets": targets}


def copy_batch(seed: int, step: int, *, batch_size: int, seq_len: int, vocab_size: int,
               lag: int = 2):
  """Batch `step`: rows [step·B, (step+1)·B) of the stream, dict of int32 [B, T]."""
  rows = [copy_example(seed, step * batch_size + i, seq_len=seq_len, vocab_size=vocab_size,
                       lag=lag) for i in range(batch_size)]
  return {k: np.stack([r[k] for r in rows]) for k in ("inputs", "targets")}


def copy_arrays(seed: int, shape, *, vocab_size: int, lag: int = 2):
  """A block of rows in one draw (for in-memory training loops, e.g. the mixer tests).

  shape: leading dims + (T,), e.g. (steps, B, T). Returns (inputs, targets) int32 of `shape`.
  A different stream from `copy_example`'s per-row one, equally deterministic given the seed.
  """
  _check(shape[-1], vocab_size, lag)
  inputs = np.random.default_rng(int(seed)).integers(0, vocab_size, size=shape, dtype=np.int32)
  targets = np.full(shape, IGNORE, np.int32)
  targets[..., lag:] = inputs[..., :-lag]
  return inputs, targets


def copy_accuracy(logits_or_preds, targets) -> float:
  """Fraction of scored positions (targets != -100) predicted exactly."""
  preds = np.asarray(logits_or_preds)
  if preds.ndim == 3:
    preds = preds.argmax(-1)
  targets = np.asarray(targets)
  mask = targets != IGNORE
  return float((preds[mask] == targets[mask]).mean())


class _Row:
  """Global row index -> example (a plain callable for grain's `map`)."""

  def __init__(self, seed, seq_len, vocab_size, lag):
    self.seed, self.seq_len, self.vocab_size, self.lag = seed, seq_len, vocab_size, lag

  def __call__(self, index):
    return copy_example(self.seed, index, seq_len=self.seq_len, vocab_size=self.vocab_size,
                        lag=self.lag)


def copy_dataset(*, seq_len: int, vocab_size: int, lag: int, batch_size: int, seed: int,
                 num_examples: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> grain.MapDataset:
  """Batches of rows [B/P, T] for this process; infinite when `num_examples` is None, else
  the first `num_examples // batch_size` global batches."""
  _check(seq_len, vocab_size, lag)
  p, count, rows = process_rows(batch_size, process_index, process_count)
  ds = grain.MapDataset.range(sys.maxsize if num_examples is None else num_examples)
  ds = ds.map(_Row(seed, seq_len, vocab_size, lag))[p::count]
  # Fixed shapes: a finite set is cut to whole batches (num_examples // B batches).
  return ds.batch(rows, drop_remainder=True)


def _field(cfg, name, default):
  value = cfg.get(name, None) if hasattr(cfg, "get") else getattr(cfg, name, None)
  return default if value is None else value


def make_datasets(data_cfg, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None):
  """`seqmix.data.pipeline.make_datasets` for `data.name="copy"`.

  Fields: `vocab_size` (16), `lag` (2), `num_val_examples` (1024; a fixed validation set drawn
  from seed + 10000).
  """
  from seqmix.data.pipeline import Datasets, _decode_ids  # pylint: disable=g-import-not-at-top
  vocab_size, lag = int(_field(data_cfg, "vocab_size", 16)), int(_field(data_cfg, "lag", 2))
  num_val = int(_field(data_cfg, "num_val_examples", 1024))
  if num_val < batch_size:
    raise ValueError(f"data.num_val_examples={num_val} is below batch_size={batch_size}: the "
                     f"validation set would be empty; raise it to a multiple of the batch.")
  kw = dict(seq_len=seq_len, vocab_size=vocab_size, lag=lag, batch_size=batch_size,
            process_index=process_index, process_count=process_count)
  train = copy_dataset(seed=seed, **kw)
  val = copy_dataset(seed=seed + _VAL_SEED_OFFSET, num_examples=num_val, **kw)
  read_options = default_read_options()
  return Datasets(train=iter(train.to_iter_dataset(read_options)),
                  validation=lambda: iter(val.to_iter_dataset(read_options)),
                  vocab_size=vocab_size, decode=_decode_ids)
