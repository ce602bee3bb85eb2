"""PoSE positions: the properties of the paper's construction, checked by decomposing the ids
back into runs with a plain loop; seeding; the pipeline hook (resumable state)."""

import ml_collections
import numpy as np
import pytest

from seqmix.data import pipeline, pose


def _runs(p):
  """Maximal runs of consecutive ids: [(start index, first id, length)]."""
  runs = [[0, int(p[0]), 1]]
  for i in range(1, len(p)):
    if p[i] == p[i - 1] + 1:
      runs[-1][2] += 1
    else:
      runs.append([i, int(p[i]), 1])
  return runs


@pytest.mark.parametrize("window,target,chunks", [(16, 64, 2), (16, 16, 2), (10, 1000, 3),
                                                  (8, 40, 1), (5, 9, 5)])
def test_positions_follow_the_construction(window, target, chunks):
  rng = np.random.default_rng(0)
  reach = 0
  for _ in range(200):
    p = pose.pose_positions(rng, window, target, chunks)
    assert p.shape == (window,) and p.dtype == np.int32
    assert p[0] == 0 and p[-1] <= target - 1
    assert np.all(np.diff(p) >= 1)                     # strictly increasing
    runs = _runs(p)
    assert len(runs) <= chunks                         # at most N − 1 skips
    skips = [first - start for start, first, _ in runs]   # u_i = id − index in the window
    assert skips[0] == 0 and skips == sorted(skips) and skips[-1] <= target - window
    reach = max(reach, int(p[-1]))
  if chunks > 1:
    assert reach >= target - 1 - max(1, (target - window) // 20)   # the skips reach the target
  if chunks == 1 or target == window:
    np.testing.assert_array_equal(p, np.arange(window))


def test_seeded():
  a = pose.pose_position_batch((3, 7), 4, 16, 256)
  np.testing.assert_array_equal(a, pose.pose_position_batch((3, 7), 4, 16, 256))
  assert not np.array_equal(a, pose.pose_position_batch((3, 8), 4, 16, 256))
  assert a.shape == (4, 16)


def test_bad_arguments():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="target_len=8 must be >= the training window"):
    pose.pose_positions(rng, 16, 8)
  with pytest.raises(ValueError, match="num_chunks=0"):
    pose.pose_positions(rng, 16, 64, 0)


def test_pipeline_hook_adds_resumable_positions():
  cfg = ml_collections.ConfigDict(dict(name="mqar", vocab_size=64, num_kv_pairs=4,
                                       num_train_examples=32, num_test_examples=8,
                                       pose_target_len=512))
  ds = pipeline.make_datasets(cfg, seq_len=32, batch_size=4, seed=0, process_index=0,
                              process_count=1)
  b = next(ds.train)
  assert b["positions"].shape == (4, 32) and b["positions"].max() <= 511
  state = ds.train.get_state()
  nxt = next(ds.train)
  ds.train.set_state(state)
  again = next(ds.train)
  np.testing.assert_array_equal(again["positions"], nxt["positions"])
  np.testing.assert_array_equal(again["inputs"], nxt["inputs"])
  assert "positions" not in next(iter(ds.validation()))
