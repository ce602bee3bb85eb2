"""The synthetic tasks behind one interface, for sweeps (`experiments/sweep.py`).

    task = make_task("induction_heads")                 # or make_task("mqar", vocab_size=256)
    x, y = task.train(seq_len=256, num_examples=10_000, seed=0)     # int32 [N, T] each
    x, y = task.test(seq_len=4096, num_examples=500, seed=0, train_seq_len=256)

`train` and `test` return in-memory (inputs, targets) arrays (targets -100 where not scored);
the test set of seed `s` is drawn from seed `s + 10` (zoology's convention), so it never
overlaps the training stream. `test(seq_len=L, train_seq_len=T)` is the length-extrapolation
set: the task at length L with the difficulty parameters of training length T (MQAR keeps the
number of key-value pairs of T; the others have no length-dependent parameter).

Tasks (name: definition; the model's vocabulary):

- `mqar`: zoology's MQAR (`seqmix.data.mqar`), the Fig. 2 setting: no random filler, pairs
  from zoology's table (T 64/128/256/512 -> 4/8/16/64, else T // 16); `vocab_size` (8192).
- `mqar_based`: the Based-paper variant, mixed (T, pairs) segments with random filler
  (`mqar.generate_mqar_mixed`); `seq_len` is the padded length (>= the longest segment);
  `vocab_size` (8192).
- `selective_copying`: Mamba's selective copying (`synthetic.SelectiveCopying`); 17.
- `induction_heads`: H3 / Mamba induction heads (`synthetic.InductionHeads`); 17.
- `passkey`: passkey retrieval, byte-level (`synthetic.PasskeyRetrieval`); 256.
- `copy`: lag-k copy (`seqmix.data.copying`); `vocab_size` (16).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from seqmix.data import copying, mqar, synthetic

TEST_SEED_OFFSET = 10  # zoology: the test set of seed s is drawn from s + 10
ZOOLOGY_PAIRS = {64: 4, 128: 8, 256: 16, 512: 64}  # zoology Fig. 2: T -> key-value pairs


@dataclasses.dataclass(frozen=True)
class Task:
  """A task's data, by length. `make` returns (inputs, targets) int32 `[N, T]`."""

  name: str
  vocab_size: int
  make: Callable[..., tuple[np.ndarray, np.ndarray]]  # (seq_len, n, seed, train_seq_len)
  kwargs: dict[str, Any]

  def train(self, *, seq_len: int, num_examples: int, seed: int):
    return self.make(seq_len=seq_len, n=num_examples, seed=seed, train_seq_len=seq_len,
                     split="train")

  def test(self, *, seq_len: int, num_examples: int, seed: int, train_seq_len: int | None = None):
    return self.make(seq_len=seq_len, n=num_examples, seed=seed + TEST_SEED_OFFSET,
                     train_seq_len=seq_len if train_seq_len is None else train_seq_len,
                     split="test")


def mqar_pairs(seq_len: int) -> int:
  return ZOOLOGY_PAIRS.get(seq_len, max(1, seq_len // 16))


def _mqar(vocab_size=8192, num_kv_pairs=None, power_a=0.01, random_non_queries=False):
  def make(*, seq_len, n, seed, train_seq_len, split):
    del split
    pairs = num_kv_pairs or mqar_pairs(train_seq_len)
    cfg = mqar.MQARConfig(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=pairs,
                          power_a=power_a, random_non_queries=random_non_queries)
    return mqar.generate_mqar(cfg, n, seed)
  return vocab_size, make


def _mqar_based(vocab_size=8192, power_a=0.01, train_segments=mqar.BASED_TRAIN_SEGMENTS,
                test_segments=mqar.BASED_TEST_SEGMENTS):
  def make(*, seq_len, n, seed, train_seq_len, split):
    del train_seq_len
    segments = train_segments if split == "train" else test_segments
    # n rows split over the segments in the proportions of their example counts.
    total = sum(s[2] for s in segments)
    counts = [max(1, round(n * s[2] / total)) for s in segments]
    scaled = [(t, p, c) for (t, p, _), c in zip(segments, counts)]
    x, y, _, _ = mqar.generate_mqar_mixed(scaled, vocab_size=vocab_size, seed=seed,
                                          power_a=power_a, seq_len=seq_len)
    return x[:n], y[:n]
  return vocab_size, make


def _source(cls, vocab_size: int, **kwargs):
  def make(*, seq_len, n, seed, train_seq_len, split):
    del train_seq_len, split
    return cls(seq_len=seq_len, num_examples=n, seed=seed, **kwargs).arrays()
  return vocab_size, make


def _selective_copying(num_data=16, num_tokens=16):
  return _source(synthetic.SelectiveCopying, num_tokens + 1, num_data=num_data,
                 num_tokens=num_tokens)


def _induction_heads(num_tokens=16):
  return _source(synthetic.InductionHeads, num_tokens + 1, num_tokens=num_tokens)


def _passkey(num_digits=5):
  return _source(synthetic.PasskeyRetrieval, 256, num_digits=num_digits)


def _copy(vocab_size=16, lag=2):
  def make(*, seq_len, n, seed, train_seq_len, split):
    del train_seq_len, split
    return copying.copy_arrays(seed, (n, seq_len), vocab_size=vocab_size, lag=lag)
  return vocab_size, make


TASKS = {
    "mqar": _mqar,
    "mqar_based": _mqar_based,
    "selective_copying": _selective_copying,
    "induction_heads": _induction_heads,
    "passkey": _passkey,
    "copy": _copy,
}


def make_task(name: str, **kwargs) -> Task:
  """The task `name` (one of TASKS) with its options (the builders' keyword arguments)."""
  if name not in TASKS:
    raise ValueError(f"Unknown task {name!r}; known: {sorted(TASKS)}.")
  try:
    vocab_size, make = TASKS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"Bad options {kwargs} for task {name!r}: {e}") from e
  return Task(name=name, vocab_size=int(vocab_size), make=make, kwargs=dict(kwargs))
