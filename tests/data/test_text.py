"""Window pipelines: shifted targets, determinism, resumability, sharding, full validation."""

import json

import numpy as np
import pytest

from seqmix.data import text

N = 100_000
TOKENS = np.arange(N, dtype=np.int32)  # token value == its offset: a row shows where it starts
ONE = {"process_index": 0, "process_count": 1}


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_windows_shift_by_one():
  batch = next(text.train_iterator(TOKENS, seq_len=16, batch_size=8, seed=0, **ONE))
  assert set(batch) == {"inputs", "targets"}
  for k in batch:
    assert batch[k].shape == (8, 16) and batch[k].dtype == np.int32
  start = batch["inputs"][:, :1]
  np.testing.assert_array_equal(batch["inputs"], start + np.arange(16))
  np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
  assert (start >= 0).all() and (start + 16 < N).all()
  assert len(np.unique(start)) > 1


def test_train_offsets_cover_range_like_nanogpt():
  # Offsets are uniform on [0, N - T): on a tiny source every offset appears, none beyond.
  src = np.arange(12, dtype=np.int32)
  batch = next(text.train_iterator(src, seq_len=4, batch_size=256, seed=1, **ONE))
  assert set(batch["inputs"][:, 0].tolist()) == set(range(8))


def test_train_deterministic_by_seed():
  a = _take(text.train_iterator(TOKENS, seq_len=8, batch_size=4, seed=3, **ONE), 3)
  b = _take(text.train_iterator(TOKENS, seq_len=8, batch_size=4, seed=3, **ONE), 3)
  c = _take(text.train_iterator(TOKENS, seq_len=8, batch_size=4, seed=4, **ONE), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  assert any((x["inputs"] != z["inputs"]).any() for x, z in zip(a, c))


def test_train_resume_from_state():
  it = text.train_iterator(TOKENS, seq_len=8, batch_size=4, seed=0, **ONE)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
  expected = _take(it, 5)
  fresh = text.train_iterator(TOKENS, seq_len=8, batch_size=4, seed=0, **ONE)
  fresh.set_state(state)
  for got, want in zip(_take(fresh, 5), expected):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_train_process_shards_are_disjoint_and_complete():
  kw = {"seq_len": 8, "batch_size": 8, "seed": 0}
  whole = _take(text.train_iterator(TOKENS, process_index=0, process_count=1, **kw), 3)
  shards = [_take(text.train_iterator(TOKENS, process_index=p, process_count=2, **kw), 3)
            for p in range(2)]
  for j in range(3):
    rows = [tuple(r) for s in shards for r in s[j]["inputs"]]
    assert shards[0][j]["inputs"].shape == (4, 8)
    # Together the two processes' batch j is the single-process batch j, no row twice.
    assert sorted(rows) == sorted(tuple(r) for r in whole[j]["inputs"])
    assert not set(map(tuple, shards[0][j]["inputs"])) & set(map(tuple, shards[1][j]["inputs"]))


def test_batch_not_divisible_by_processes():
  with pytest.raises(ValueError, match="divisible by process_count"):
    text.train_windows(TOKENS, seq_len=8, batch_size=6, seed=0, process_index=0, process_count=4)


def test_source_too_short():
  with pytest.raises(ValueError, match="seq_len"):
    text.train_windows(np.arange(8), seq_len=8, batch_size=2, seed=0, **ONE)


def _scored(batches):
  pairs = []
  for b in batches:
    m = b["targets"] != text.IGNORE
    pairs += list(zip(b["inputs"][m].tolist(), b["targets"][m].tolist()))
  return pairs


@pytest.mark.parametrize("n,seq_len,batch_size", [(101, 10, 4), (1000, 7, 8), (9, 8, 2)])
def test_validation_covers_every_target_once(n, seq_len, batch_size):
  x = (np.arange(n) * 7 + 3).astype(np.int32)  # distinct tokens
  batches = list(text.validation_batches_fn(x, seq_len=seq_len, batch_size=batch_size, **ONE)())
  assert all(b["inputs"].shape == (batch_size, seq_len) for b in batches)
  pairs = _scored(batches)
  assert len(pairs) == n - 1
  assert sorted(pairs) == sorted(zip(x[:-1].tolist(), x[1:].tolist()))


def test_validation_sharded_union_is_whole():
  x = np.arange(1, 500, dtype=np.int32)
  kw = {"seq_len": 9, "batch_size": 4}
  per_proc = [list(text.validation_batches_fn(x, process_index=p, process_count=2, **kw)())
              for p in range(2)]
  assert len(per_proc[0]) == len(per_proc[1])  # lockstep for collectives
  assert all(b["inputs"].shape == (2, 9) for bs in per_proc for b in bs)
  pairs = _scored(per_proc[0]) + _scored(per_proc[1])
  assert sorted(pairs) == list(zip(x[:-1].tolist(), x[1:].tolist()))


def test_documents_segment_ids_and_no_cross_document_targets():
  # Documents [0, 5), [5, 12), [12, 20): a window over the boundaries.
  src = text.ArrayTokens(np.arange(100, 120, dtype=np.int32), document_starts=[0, 5, 12])
  row = text.window(src, 3, 8)
  np.testing.assert_array_equal(row["inputs"], np.arange(103, 111))
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 2, 2, 2, 2, 2, 2])
  np.testing.assert_array_equal(row["positions"], [0, 1, 0, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(row["targets"], [104, -100, 106, 107, 108, 109, 110, 111])
  # Validation over documents still scores every within-document target once.
  batches = list(text.validation_batches_fn(src, seq_len=6, batch_size=2, **ONE)())
  assert all("segment_ids" in b for b in batches)
  assert len(_scored(batches)) == 20 - 3


def test_split_source_view():
  src = text.ArrayTokens(np.arange(50), document_starts=[0, 20, 47])
  train, val = text.split_source(src, 0.1)
  assert (len(train), len(val)) == (45, 5)
  np.testing.assert_array_equal(val.read(0, 5), np.arange(45, 50))
  np.testing.assert_array_equal(val.document_starts, [0, 2])
  np.testing.assert_array_equal(train.document_starts, [0, 20])
