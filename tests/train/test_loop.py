"""The training loop: resume equals the uninterrupted run; non-finite loss handling;
checkpoints and TensorBoard files. Uses the real grain MQAR pipeline and a tiny stand-in
model (the loop must not depend on any particular mixer)."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TinyLM

from experiments.configs import mqar as mqar_config
from seqmix.train import checkpoint as ckpt_lib
from seqmix.train import loop
from seqmix.train import step as step_lib


class Killed(Exception):
  pass


def _config(steps=8, ckpt_every=3, log_every=1):
  c = mqar_config.get_config("smoke")
  c.train.update(steps=steps, decay_steps=steps, ckpt_every=ckpt_every, log_every=log_every,
                 eval_every=0, progress=False, batch_size=8)
  c.data.num_train_examples = 64
  c.data.num_test_examples = 16
  return c


def _model(config):
  return TinyLM(vocab_size=config.data.vocab_size, d_model=16, dropout=0.1)


def _recorder(out, kill_at=None):
  def hook(step, metrics):
    out.append((step, float(metrics["loss"])))
    if step == kill_at:
      raise Killed(step)
  return hook


def test_resume_equals_uninterrupted(tmp_path):
  config = _config()
  straight = []
  summary = loop.train(config, str(tmp_path / "a"), hooks=[_recorder(straight)],
                       model=_model(config))
  assert [s for s, _ in straight] == list(range(8))
  assert summary["step"] == 8
  # Validation is the whole test split: every example scores num_kv_pairs tokens.
  assert summary["val"]["tokens"] == config.data.num_test_examples * config.data.num_kv_pairs

  first, second = [], []
  with pytest.raises(Killed):  # killed after update 5; newest checkpoint is step 3
    loop.train(config, str(tmp_path / "b"), hooks=[_recorder(first, kill_at=4)],
               model=_model(config))
  resumed = loop.train(config, str(tmp_path / "b"), hooks=[_recorder(second)],
                       model=_model(config))
  assert resumed["start_step"] == 3
  assert [s for s, _ in second] == list(range(3, 8))
  # Same data, dropout masks, optimizer state: bitwise the same losses on the same device.
  np.testing.assert_array_equal([l for _, l in first], [l for _, l in straight[:5]])
  np.testing.assert_array_equal([l for _, l in second], [l for _, l in straight[3:]])
  np.testing.assert_array_equal(resumed["val"]["loss"], summary["val"]["loss"])
  assert glob.glob(str(tmp_path / "a" / "tb" / "events.out.tfevents.*"))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  real = step_lib.make_train_step

  def poisoned(model, optimizer, **kw):
    inner = real(model, optimizer, **dict(kw, jit=False))

    def train_step(state, batch):
      new, m = inner(state, batch)
      nan = jnp.where(state.step >= 5, jnp.nan, 0.0)  # update 5 goes bad
      new = new.replace(params=jax.tree.map(lambda p: p + nan, new.params))
      return new, dict(m, loss=m["loss"] + nan)
    return jax.jit(train_step, donate_argnums=(0,))

  monkeypatch.setattr(step_lib, "make_train_step", poisoned)
  config = _config(steps=10, ckpt_every=2, log_every=3)
  workdir = str(tmp_path / "run")
  with pytest.raises(loop.NonFiniteLossError, match="at step 5") as err:
    loop.train(config, workdir, model=_model(config))
  assert err.value.step == 5
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    assert ckpt.all_steps() == [2, 4]  # nothing saved at or after the bad update
    state = loop.state_lib.create_train_state(
        _model(config), loop.optim.make_optimizer(config.train), jax.random.PRNGKey(0),
        {"inputs": np.zeros((1, config.train.seq_len), np.int32)})
    restored, data_state, _ = ckpt.restore(state)
    assert int(restored.step) == 4 and ckpt_lib.all_finite(restored.params)
    assert data_state  # the iterator position travels with the checkpoint
  finally:
    ckpt.close()


def test_checkpointer_refuses_non_finite_params(tmp_path):
  state = loop.state_lib.TrainState(step=jnp.int32(1), params={"w": jnp.array([1.0, jnp.nan])},
                                    opt_state=(), rng=jax.random.PRNGKey(0))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  try:
    with pytest.raises(ValueError, match="not finite"):
      ckpt.save(1, state, {"next_index": 1}, {})
    assert ckpt.latest_step() is None
  finally:
    ckpt.close()


def test_loop_does_not_wait_for_the_device_between_log_points(tmp_path, monkeypatch):
  """The host reads device values only once per log window (not per step).

  Counts the device->host reads that go through jax.Array's Python methods (`device_get`,
  `float` / `int` / `bool`, `block_until_ready`); a plain `np.asarray(array)` takes a C++
  path this cannot see. Each hook call records the count: it may change only where a window
  was just read (the lagged read of the window that ended one step earlier).
  """
  from jax._src import array as array_lib  # pylint: disable=g-import-not-at-top

  reads = []
  value = array_lib.ArrayImpl._value
  block = array_lib.ArrayImpl.block_until_ready

  def counted_value(self):
    if self._npy_value is None:  # a cached value costs nothing
      reads.append(1)
    return value.fget(self)

  def counted_block(self):
    reads.append(1)
    return block(self)

  config = _config(steps=12, ckpt_every=0, log_every=4)  # checkpoint and eval at the end
  config.train.tensorboard = False
  seen = []
  monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(counted_value))
  monkeypatch.setattr(array_lib.ArrayImpl, "block_until_ready", counted_block)
  summary = loop.train(config, str(tmp_path), model=_model(config),
                       hooks=[lambda s, m: seen.append(len(reads))])
  monkeypatch.undo()
  assert summary["step"] == 12 and np.isfinite(summary["train"]["loss"])
  changed = [s for s in range(1, 12) if seen[s] != seen[s - 1]]
  # Windows [0, 4) and [4, 8) are read while steps 4 and 8 run, i.e. after hooks 4 and 8.
  assert set(changed) <= {5, 9}, f"host read device values before the hooks of steps {changed}"
  assert changed, "the lagged log reads were not counted: the test would not see a sync"
