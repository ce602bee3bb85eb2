"""MQAR: zoology's invariants, placement law, determinism, accuracy."""

import jax
import numpy as np
import pytest

from seqmix.data import mqar, text

CFG = mqar.MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=8)
ONE = {"process_index": 0, "process_count": 1}


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_invariants(random_non_queries):
  cfg = mqar.MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=8,
                        random_non_queries=random_non_queries)
  inputs, targets = mqar.generate_mqar(cfg, 300, seed=0)
  assert inputs.shape == targets.shape == (300, 64)
  assert inputs.dtype == targets.dtype == np.int32
  P, half = cfg.num_kv_pairs, cfg.vocab_size // 2
  assert inputs.min() >= 0 and inputs.max() < cfg.vocab_size
  for x, y in zip(inputs, targets):
    keys, values = x[0:2 * P:2], x[1:2 * P:2]
    assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < 128)).all()
    assert len(set(keys)) == P and len(set(values)) == P
    pos = np.flatnonzero(y != -100)
    assert len(pos) == P  # every key is queried exactly once: no -100-only rows
    assert (pos >= 2 * P).all() and ((pos - 2 * P) % 2 == 0).all()  # query slots
    kv = dict(zip(keys.tolist(), values.tolist()))
    assert sorted(x[pos].tolist()) == sorted(keys.tolist())
    for p in pos:
      assert y[p] == kv[int(x[p])]  # the label is the value paired with the query's key earlier
    rest = np.ones(64, bool)
    rest[:2 * P] = False
    rest[pos] = False
    if not random_non_queries:
      assert (x[rest] == 0).all()
  if random_non_queries:
    filler = inputs[:, 2 * P:][targets[:, 2 * P:] == -100]
    # Uniform over [0, V): all of it is used and zeros are as rare as any other id.
    assert len(np.unique(filler)) == cfg.vocab_size
    assert np.mean(filler == 0) < 3.0 / cfg.vocab_size


def test_power_law_placement():
  def slot_histogram(power_a):
    cfg = mqar.MQARConfig(vocab_size=128, seq_len=64, num_kv_pairs=4, power_a=power_a)
    _, targets = mqar.generate_mqar(cfg, 2000, seed=1)
    rows, pos = np.nonzero(targets != -100)
    return np.bincount((pos - 8) // 2, minlength=28) / len(pos)

  uniform, power = slot_histogram(1.0), slot_histogram(0.01)
  # power_a=1: every slot equally likely (1/28 ≈ 0.036 each; 8000 draws, std ≈ 0.002).
  assert np.abs(uniform - 1 / 28).max() < 0.012
  # power_a=0.01: p ∝ 1/i, so the first slot is the most used and early slots dominate.
  assert power.argmax() == 0 and power[:7].sum() > 0.4 and power[-7:].sum() < 0.2
  assert power[0] > power[3] > power[20]


def test_deterministic_by_seed():
  a = mqar.generate_mqar(CFG, 20, seed=5)
  b = mqar.generate_mqar(CFG, 20, seed=5)
  c = mqar.generate_mqar(CFG, 20, seed=6)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert (a[0] != c[0]).any()


@pytest.mark.parametrize("kw,match", [({"seq_len": 63}, "even"), ({"vocab_size": 64}, "vocab_size"),
                                      ({"num_kv_pairs": 17}, "4 \\* num_kv_pairs")])
def test_config_checks(kw, match):
  fields = {"vocab_size": 128, "seq_len": 64, "num_kv_pairs": 8} | kw
  with pytest.raises(ValueError, match=match):
    mqar.generate_mqar(mqar.MQARConfig(**fields), 2, 0)


def test_train_and_test_sets():
  train = mqar.mqar_train(CFG, num_examples=10, batch_size=4, seed=0, **ONE)
  it = iter(train.to_iter_dataset(text.default_read_options()))
  rows = np.concatenate([next(it)["inputs"] for _ in range(5)])  # 20 rows = two epochs
  train_set = {tuple(r) for r in mqar.generate_mqar(CFG, 10, 0)[0]}
  assert {tuple(r) for r in rows} == train_set
  test_inputs, test_targets = mqar.generate_mqar(CFG, 10, 10)  # zoology: test seed = seed + 10
  batches = list(mqar.mqar_test(CFG, num_examples=10, batch_size=4, seed=0, **ONE))
  assert len(batches) == 3 and all(b["inputs"].shape == (4, 64) for b in batches)
  got = np.concatenate([b["targets"] for b in batches])
  np.testing.assert_array_equal(got[:10], test_targets)
  assert (got[10:] == -100).all()  # padding rows
  assert not train_set & {tuple(r) for r in test_inputs}


def test_accuracy():
  targets = np.full((3, 6), -100)
  targets[0, [1, 3]] = [5, 6]
  targets[1, [2, 4]] = [7, 8]
  preds = np.zeros((3, 6), np.int32)
  preds[0, [1, 3]] = [5, 6]  # 2/2
  preds[1, 2] = 7  # 1/2
  per, mean = mqar.mqar_accuracy(preds, targets)
  np.testing.assert_allclose(per[:2], [1.0, 0.5])
  assert np.isnan(per[2])  # a padding row: no scored positions, left out of the mean
  np.testing.assert_allclose(mean, 0.75)
  logits = jax.nn.one_hot(preds, 10)
  per_l, mean_l = jax.jit(mqar.mqar_accuracy)(logits, targets)
  np.testing.assert_allclose(mean_l, 0.75)
  np.testing.assert_allclose(per_l[:2], per[:2])
