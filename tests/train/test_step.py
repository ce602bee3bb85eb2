"""train_step / eval_step: accumulation, learning, whole-split evaluation."""

import jax
import numpy as np
import optax

from seqmix.testing import assert_trees_rel_close
from seqmix.train import config as config_lib
from seqmix.train import optim
from seqmix.train import state as state_lib
from seqmix.train import step as step_lib


def _batch(b=8, t=6, vocab=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, vocab, (b, t)).astype(np.int32)
  y = rng.integers(0, vocab, (b, t)).astype(np.int32)
  # Uneven scored counts per row, so mean-of-means accumulation would differ.
  for i in range(b):
    y[i, : i % t] = -100
  return {"inputs": x, "targets": y}


def _setup(model, **over):
  cfg = config_lib.train_defaults()
  cfg.update(lr=1e-2, min_lr=1e-3, warmup_steps=2, decay_steps=50, **over)
  tx = optim.make_optimizer(cfg)
  state = state_lib.create_train_state(model, tx, jax.random.PRNGKey(0),
                                       {"inputs": np.zeros((1, 6), np.int32)})
  return tx, state


def test_accumulation_equals_one_big_batch(tiny_model):
  batch = _batch()
  tx, s1 = _setup(tiny_model)
  _, s4 = _setup(tiny_model)
  # The loss is the token-weighted mean NLL over scored targets (computed before the step,
  # which donates the state's buffers).
  logits, _ = tiny_model.apply({"params": s1.params}, batch["inputs"])
  mask = batch["targets"] != -100
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits, np.where(mask, batch["targets"], 0))
  big = step_lib.make_train_step(tiny_model, tx, grad_accum=1)
  acc = step_lib.make_train_step(tiny_model, tx, grad_accum=4)
  for i in range(3):
    s1, m1 = big(s1, batch)
    s4, m4 = acc(s4, batch)
    # float32 sums in a different order: ~1e-7 relative per add; 1e-5 is the dtype default.
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
    if i == 0:
      np.testing.assert_allclose(float(m1["loss"]), float(nll[mask].mean()), rtol=1e-5)
      assert float(m1["tokens"]) == float(m4["tokens"]) == mask.sum()
  assert_trees_rel_close(s4.params, s1.params, 1e-5, "params")


def test_train_step_reduces_loss(tiny_model):
  batch = _batch(seed=1)
  tx, state = _setup(tiny_model)
  step = step_lib.make_train_step(tiny_model, tx)
  losses = []
  for _ in range(40):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert int(state.step) == 40
  assert losses[-1] < 0.5 * losses[0], losses


def test_evaluate_covers_the_whole_split(tiny_model):
  _, state = _setup(tiny_model)
  full = _batch(b=11, seed=2)
  # Batches of 4, 4, 3 rows: the token-weighted mean must equal one pass over all 11 rows.
  parts = [{k: v[s:s + 4] for k, v in full.items()} for s in range(0, 11, 4)]
  ev = step_lib.make_eval_step(tiny_model)
  out = step_lib.evaluate(ev, state.params, parts)
  whole = step_lib.evaluate(ev, state.params, [full])
  assert out["tokens"] == (full["targets"] != -100).sum()
  np.testing.assert_allclose(out["loss"], whole["loss"], rtol=1e-6)
  np.testing.assert_allclose(out["accuracy"], whole["accuracy"], rtol=1e-6)
  # The mean of per-batch means differs (batches score different token counts).
  means = [step_lib.evaluate(ev, state.params, [p])["loss"] for p in parts]
  assert abs(np.mean(means) - out["loss"]) > 1e-6
