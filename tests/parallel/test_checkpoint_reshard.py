"""Save a sharded train state on one mesh, restore it on another (seqmix.train.checkpoint).

On the 8 simulated CPU devices: a tiny mha LM trained 2 steps sharded fsdp=8 is saved,
restored as data=2 x fsdp=4 (orbax restore with the new mesh's `state_shardings`): params
and optimizer state must be identical and laid out as the new mesh says, and 2 more steps
on the new mesh must give the losses and params of 2 more steps on the old one. Then the
same through `loop.train` (a smaller stand-in model, to keep compiles short): a run killed
after a checkpoint on fsdp=8 resumes on data=2 x fsdp=4 and ends where the uninterrupted run
ends.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqmix.models.lm import LanguageModel
from seqmix.parallel import axes
from seqmix.parallel import mesh as mesh_lib
from seqmix.parallel import sharding
from seqmix.testing import assert_rel_close
from seqmix.testing import assert_trees_rel_close
from seqmix.train import checkpoint as ckpt_lib
from seqmix.train import optim
from seqmix.train import state as state_lib

# float32 everywhere; the two meshes reduce gradients in different orders (fsdp=8 sums 8
# partial products, data=2 x fsdp=4 sums 4 then 2), so continued steps agree to rounding.
RTOL = 1e-5
VOCAB, B, T = 64, 8, 16
SAVE_MESH = {"fsdp": 8}
RESTORE_MESH = {"data": 2, "fsdp": 4}


def _model(vocab_size=VOCAB):
  return LanguageModel(vocab_size=vocab_size, d_model=32, n_layers=1, mixer="mha",
                       mlp_ratio=4.0, mixer_kwargs={"mha": {"num_heads": 4}})


def _optimizer():
  return optax.chain(optax.clip_by_global_norm(0.5),
                     optax.adamw(1e-2, weight_decay=0.1, mask=optim.decay_mask))


def _batches(n):
  rng = np.random.default_rng(0)
  return [{"inputs": rng.integers(0, VOCAB, (B, T)).astype(np.int32),
           "targets": rng.integers(0, VOCAB, (B, T)).astype(np.int32)} for _ in range(n)]


def _setup(cfg, model, opt, batch):
  mesh = mesh_lib.make_mesh(cfg)
  rules = mesh_lib.logical_rules(cfg)
  sh = sharding.state_shardings(model, opt, batch, mesh, rules)
  step = sharding.make_sharded_train_step(model, opt, mesh, rules, sh)
  return mesh, rules, sh, step


def _run(step, state, batches, mesh, rules):
  losses = []
  for b in batches:
    state, m = step(state, sharding.shard_batch(b, mesh, rules))
    losses.append(m["loss"])
  return state, np.array(jax.device_get(losses))


def test_restore_onto_a_different_mesh_continues_like_uninterrupted(tmp_path):
  model, opt = _model(), _optimizer()
  batches = _batches(4)
  mesh_a, rules_a, _, step_a = _setup(SAVE_MESH, model, opt, batches[0])
  # Placed rather than initialised sharded: the sharded init would compile for seconds more.
  state = jax.device_put(
      state_lib.create_train_state(model, opt, jax.random.PRNGKey(0), batches[0]),
      sharding.state_shardings(model, opt, batches[0], mesh_a, rules_a).state)
  state, _ = _run(step_a, state, batches[:2], mesh_a, rules_a)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  try:
    ckpt.save(2, state, {"next_index": 2}, {"best_val_loss": None})
    saved = jax.device_get(state)  # host copy: the steps below donate `state`
    straight, losses_a = _run(step_a, state, batches[2:], mesh_a, rules_a)

    mesh_b, rules_b, sh_b, step_b = _setup(RESTORE_MESH, model, opt, batches[0])
    target = sharding.abstract_train_state(model, opt, batches[0], sh_b)
    restored, data_state, meta = ckpt.restore(target)
  finally:
    ckpt.close()
  assert data_state == {"next_index": 2} and meta == {"best_val_loss": None}
  assert int(restored.step) == 2
  # Every leaf lives on the new mesh, sharded as its state_shardings say.
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(sh_b.state)):
    assert got.sharding.mesh.shape == mesh_b.shape
    assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
  emb = restored.params["embed"]["embedding"]  # [V, D] = [64, 32], D -> fsdp
  assert emb.sharding.shard_shape(emb.shape) == (64, 8)  # fsdp=8 held (64, 4)
  assert_trees_rel_close(jax.device_get(restored.params), saved.params, 0.0, name="params")
  assert_trees_rel_close(jax.device_get(restored.opt_state), saved.opt_state, 0.0,
                         name="opt_state")
  np.testing.assert_array_equal(jax.device_get(restored.rng), saved.rng)

  resumed, losses_b = _run(step_b, restored, batches[2:], mesh_b, rules_b)
  assert_rel_close(losses_b, losses_a, RTOL, name="losses after resume")
  assert_trees_rel_close(jax.device_get(resumed.params), jax.device_get(straight.params), RTOL,
                         name="params after resume")


class Killed(Exception):
  pass


class ShardedTinyLM(nn.Module):
  """embed [V, D] -> x + Dense(x, x shifted by one) -> LayerNorm -> head [D, V], with logical
  axis names, so that fsdp shards D (the LanguageModel of the test above compiles slower)."""
  vocab_size: int = 64
  d_model: int = 16

  @nn.compact
  def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None,
               deterministic=True):
    del segment_ids, positions, deterministic
    emb = self.param("embed", axes.param(nn.initializers.normal(0.02), axes.VOCAB, axes.EMBED),
                     (self.vocab_size, self.d_model))
    x = emb[tokens]  # [b, t, d]
    prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]  # [b, t, d], x[t-1]
    w = self.param("mix", axes.param(nn.initializers.lecun_normal(), axes.MLP, axes.EMBED),
                   (2 * self.d_model, self.d_model))
    x = nn.LayerNorm(name="norm")(x + jnp.concatenate([x, prev], -1) @ w)
    head = self.param("head", axes.param(nn.initializers.lecun_normal(), axes.EMBED, axes.VOCAB),
                      (self.d_model, self.vocab_size))
    return (x @ head).astype(jnp.float32), cache


def _loop(workdir, mesh, steps=3, kill_at=None):
  from experiments.configs import mqar as mqar_config  # pylint: disable=g-import-not-at-top
  from seqmix.train import loop  # pylint: disable=g-import-not-at-top

  c = mqar_config.get_config("smoke")
  c.train.update(steps=steps, decay_steps=steps, warmup_steps=1, ckpt_every=2, log_every=1,
                 eval_every=0, progress=False, tensorboard=False, batch_size=8)
  c.train.mesh = mesh
  c.data.num_train_examples = 32
  c.data.num_test_examples = 8
  losses = []

  def hook(s, m):
    losses.append((s, float(jax.device_get(m["loss"]))))
    if s == kill_at:
      raise Killed(s)

  summary = loop.train(c, str(workdir), model=ShardedTinyLM(vocab_size=c.data.vocab_size),
                       hooks=[hook])
  return summary, losses


def test_train_resumes_onto_the_mesh_the_config_now_asks_for(tmp_path):
  straight, losses = _loop(tmp_path / "a", SAVE_MESH)
  with pytest.raises(Killed):  # killed at update 3 (s=2); the newest checkpoint is step 2
    _loop(tmp_path / "b", SAVE_MESH, kill_at=2)
  resumed, resumed_losses = _loop(tmp_path / "b", RESTORE_MESH)
  assert resumed["start_step"] == 2 and [s for s, _ in resumed_losses] == [2]
  assert_rel_close(np.array([l for _, l in resumed_losses]),
                   np.array([l for _, l in losses[2:]]), RTOL, name="resumed losses")
  assert_rel_close(resumed["val"]["loss"], straight["val"]["loss"], RTOL, name="val loss")


def test_batch_that_does_not_divide_over_the_mesh_is_refused(tmp_path):
  from experiments.configs import mqar as mqar_config  # pylint: disable=g-import-not-at-top
  from seqmix.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from seqmix.train import loop  # pylint: disable=g-import-not-at-top

  c = mqar_config.get_config("smoke")
  c.train.update(batch_size=12, progress=False, tensorboard=False)
  c.train.mesh = {"data": 8}
  with pytest.raises(config_lib.ConfigError, match=r"batch_size=12 does not divide over the 8"):
    loop.train(c, str(tmp_path), model=ShardedTinyLM(vocab_size=c.data.vocab_size))
