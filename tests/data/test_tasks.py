"""Invariants of the synthetic tasks (seqmix/data/synthetic.py, mqar's Based variant, tasks.py)."""

import grain
import numpy as np
import pytest

from seqmix.data import mqar, synthetic, tasks
from seqmix.data.common import IGNORE


def _check_mqar_row(x, y, length, pairs, vocab):
  """Every key of the prefix queried exactly once; scored only there, with its value."""
  keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
  assert len(set(keys.tolist())) == pairs
  assert np.all((keys >= 1) & (keys < vocab // 2)) and np.all(values >= vocab // 2)
  scored = np.flatnonzero(y != IGNORE)
  assert len(scored) == pairs
  assert np.all(scored >= 2 * pairs) and np.all(scored < length)
  lookup = dict(zip(keys.tolist(), values.tolist()))
  queried = x[scored].tolist()
  assert sorted(queried) == sorted(keys.tolist())  # each key once
  assert [lookup[k] for k in queried] == y[scored].tolist()


def test_mqar_based_mixed_lengths():
  segments = ((32, 2, 30), (64, 4, 20), (64, 8, 10))
  x, y, lens, pairs = mqar.generate_mqar_mixed(segments, vocab_size=128, seed=3)
  assert x.shape == y.shape == (60, 64) and x.dtype == np.int32
  assert sorted(np.unique(lens).tolist()) == [32, 64]
  assert {(int(a), int(b)) for a, b in zip(lens, pairs)} == {(32, 2), (64, 4), (64, 8)}
  assert np.bincount(pairs)[[2, 4, 8]].tolist() == [30, 20, 10]
  for xi, yi, t, p in zip(x, y, lens, pairs):
    _check_mqar_row(xi, yi, t, p, 128)
    assert np.all(yi[t:] == IGNORE) and np.all(xi[t:] == 0)  # right padding, never scored
  # random filler (Based): the query region holds non-zero filler, not zeros
  long_rows = lens == 64
  assert np.mean(x[long_rows][:, 20:] == 0) < 0.05
  x2, y2, _, _ = mqar.generate_mqar_mixed(segments, vocab_size=128, seed=3)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  assert not np.array_equal(x, mqar.generate_mqar_mixed(segments, vocab_size=128, seed=4)[0])


def test_selective_copying_targets():
  src = synthetic.SelectiveCopying(seq_len=96, num_examples=20, seed=0, num_data=8,
                                   num_tokens=16)
  assert src.vocab_size == 17
  for i in range(len(src)):
    r = src[i]
    x, y, pos = r["inputs"], r["targets"], r["data_positions"]
    assert x.shape == y.shape == (96,)
    ctx = 96 - 8
    assert np.all(np.diff(pos) > 0) and pos.max() < ctx
    assert np.all(x[ctx:] == src.marker)
    data_mask = np.zeros(ctx, bool)
    data_mask[pos] = True
    assert np.all(x[:ctx][~data_mask] == src.noise)
    assert np.all((x[pos] >= 1) & (x[pos] < 16))
    np.testing.assert_array_equal(y[ctx:], x[pos])  # copied in order
    assert np.all(y[:ctx] == IGNORE)


def test_induction_heads_answer():
  src = synthetic.InductionHeads(seq_len=64, num_examples=50, seed=1, num_tokens=16)
  ps = []
  for i in range(len(src)):
    r = src[i]
    x, y, p = r["inputs"], r["targets"], int(r["trigger_position"])
    assert np.flatnonzero(x == src.special).tolist() == [p, 63]
    assert np.flatnonzero(y != IGNORE).tolist() == [63]
    assert y[63] == x[p + 1] == r["answer"]
    ps.append(p)
  assert min(ps) < 16 and max(ps) > 40  # the trigger ranges over the context


@pytest.mark.parametrize("seq_len", [1024, 1500])
def test_passkey_position_and_answer(seq_len):
  src = synthetic.PasskeyRetrieval(seq_len=seq_len, num_examples=20, seed=2)
  depths = []
  for i in range(len(src)):
    r = src[i]
    x, y = r["inputs"], r["targets"]
    assert x.shape == y.shape == (seq_len,)
    key = str(int(r["key"]))
    assert len(key) == 5
    k = int(r["key_position"])
    assert bytes(x[k:k + 5].astype(np.uint8)).decode() == key
    text = bytes(x.astype(np.uint8)).decode()
    assert text.startswith(synthetic.PASSKEY_INTRO)
    assert text.count(key) >= 2 and text.endswith(synthetic.PASSKEY_QUESTION + key[:-1])
    scored = np.flatnonzero(y != IGNORE)
    assert scored.tolist() == list(range(seq_len - 5, seq_len))
    assert bytes(y[scored].astype(np.uint8)).decode() == key
    depths.append(float(r["depth"]))
  assert min(depths) < 0.3 and max(depths) > 0.7


def test_passkey_too_short():
  with pytest.raises(ValueError, match="too short"):
    synthetic.PasskeyRetrieval(seq_len=200, num_examples=1, seed=0)


@pytest.mark.parametrize("cls,kw", [
    (synthetic.SelectiveCopying, {"seq_len": 64, "num_data": 4}),
    (synthetic.InductionHeads, {"seq_len": 32}),
    (synthetic.PasskeyRetrieval, {"seq_len": 1024}),
])
def test_deterministic_by_seed_and_grain(cls, kw):
  a, b, c = cls(num_examples=8, seed=5, **kw), cls(num_examples=8, seed=5, **kw), cls(
      num_examples=8, seed=6, **kw)
  xa, ya = a.arrays()
  np.testing.assert_array_equal(xa, b.arrays()[0])
  np.testing.assert_array_equal(ya, b.arrays()[1])
  assert not np.array_equal(xa, c.arrays()[0])
  # row i depends on (seed, i) only: reading through grain, out of order, gives the same rows
  ds = grain.MapDataset.source(a)[::-1].batch(4)
  got = np.concatenate([batch["inputs"] for batch in ds])[::-1]
  np.testing.assert_array_equal(got, xa)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_task_interface(name):
  kw = {"vocab_size": 256} if name.startswith("mqar") else {}
  if name == "mqar_based":
    kw.update(train_segments=((32, 2, 10), (64, 4, 10)), test_segments=((64, 8, 5),))
  task = tasks.make_task(name, **kw)
  t = 1024 if name == "passkey" else 64
  x, y = task.train(seq_len=t, num_examples=6, seed=0)
  assert x.shape == y.shape == (6, t) and x.dtype == y.dtype == np.int32
  assert x.max() < task.vocab_size and x.min() >= 0
  assert np.all((y == IGNORE) | ((y >= 0) & (y < task.vocab_size)))
  assert np.all((y != IGNORE).sum(1) > 0)
  xt, _ = task.test(seq_len=2 * t, num_examples=3, seed=0, train_seq_len=t)
  assert xt.shape == (3, 2 * t)
  xs, _ = task.test(seq_len=t, num_examples=6, seed=0)
  assert not np.array_equal(xs, x)  # the test stream is seed + 10, not the training rows


def test_mqar_extrapolation_keeps_pairs():
  task = tasks.make_task("mqar", vocab_size=1024)
  _, y = task.test(seq_len=512, num_examples=4, seed=0, train_seq_len=128)
  assert np.all((y != IGNORE).sum(1) == tasks.mqar_pairs(128))


def test_unknown_task():
  with pytest.raises(ValueError, match="known"):
    tasks.make_task("nope")
  with pytest.raises(ValueError, match="Bad options"):
    tasks.make_task("induction_heads", vocab=3)
