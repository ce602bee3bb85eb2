"""The lag-k copy task (seqmix.data.copying) that the model and mixer tests train on.

(Here rather than in tests/data/ because this file belongs with its owner's model tests; it
may move to tests/data/test_copying.py.)
"""

import numpy as np
import pytest

from seqmix.data import copying, pipeline


def test_targets_are_inputs_lagged_and_unscored_before_lag():
  b = copying.copy_batch(0, 3, batch_size=4, seq_len=10, vocab_size=7, lag=3)
  assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (4, 10)
  assert (b["targets"][:, :3] == -100).all()
  np.testing.assert_array_equal(b["targets"][:, 3:], b["inputs"][:, :-3])
  assert b["inputs"].min() >= 0 and b["inputs"].max() < 7
  inputs, targets = copying.copy_arrays(1, (2, 3, 10), vocab_size=7, lag=3)
  np.testing.assert_array_equal(targets[..., 3:], inputs[..., :-3])


def test_deterministic_given_seed_and_different_across_seeds():
  kw = dict(batch_size=4, seq_len=16, vocab_size=50, lag=2)
  a, b = copying.copy_batch(5, 2, **kw), copying.copy_batch(5, 2, **kw)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert not np.array_equal(a["inputs"], copying.copy_batch(6, 2, **kw)["inputs"])
  assert not np.array_equal(a["inputs"], copying.copy_batch(5, 3, **kw)["inputs"])


def test_make_datasets_rows_do_not_depend_on_sharding():
  cfg = {"name": "copy", "vocab_size": 11, "lag": 2, "num_val_examples": 8}
  kw = dict(seq_len=12, batch_size=4, seed=3)
  whole = next(pipeline.make_datasets(cfg, process_index=0, process_count=1, **kw).train)
  halves = [next(pipeline.make_datasets(cfg, process_index=p, process_count=2, **kw).train)
            for p in range(2)]
  np.testing.assert_array_equal(whole["inputs"],
                                copying.copy_batch(3, 0, batch_size=4, seq_len=12,
                                                   vocab_size=11, lag=2)["inputs"])
  got = np.empty_like(whole["inputs"])
  got[0::2], got[1::2] = halves[0]["inputs"], halves[1]["inputs"]  # rows p::count
  np.testing.assert_array_equal(got, whole["inputs"])
  ds = pipeline.make_datasets(cfg, process_index=0, process_count=1, **kw)
  assert ds.vocab_size == 11 and len(list(ds.validation())) == 2


def test_bad_settings_say_what_to_change():
  with pytest.raises(ValueError, match="seq_len=2 must exceed lag=2"):
    copying.copy_example(0, 0, seq_len=2, vocab_size=5, lag=2)
  with pytest.raises(ValueError, match="lag=0"):
    copying.copy_example(0, 0, seq_len=4, vocab_size=5, lag=0)


def test_copy_accuracy_scores_only_targets():
  targets = np.array([[-100, -100, 1, 2]])
  assert copying.copy_accuracy(np.array([[9, 9, 1, 0]]), targets) == 0.5
