"""The sharded train step (seqmix.parallel.sharding) equals the single-device step.

On the 8 simulated CPU devices of tests/conftest.py: DP, FSDP, TP, DP×FSDP×TP, DP×sequence and
sequence meshes run one step of a tiny two-layer LM (mha, gla); loss and updated params must
match the single-device step at float32 rtol 1e-5, and the params and Adam moments must be
sharded as the logical-axis rules say. With the sequence sharded, the step must trace the
sequence-parallel ops (ring attention, gla state passing).
"""

import jax
import numpy as np
import optax
import pytest

from seqmix.models.lm import LanguageModel
from seqmix.parallel import mesh as mesh_lib
from seqmix.parallel import sharding
from seqmix.testing import assert_rel_close
from seqmix.testing import assert_trees_rel_close
from seqmix.train import optim
from seqmix.train import state as state_lib
from seqmix.train import step as step_lib

RTOL = 1e-5
VOCAB, B, T = 64, 8, 16


def _model(**kw):
  # 4 heads of 8 (mha) and of 16 (gla, key dim 16): heads divide tensor=2 and tensor=4;
  # mlp_ratio 4 -> hidden 128 divides every mesh axis here.
  kw = dict(vocab_size=VOCAB, d_model=32, n_layers=2, mixer="mha,gla", mlp_ratio=4.0,
            mixer_kwargs={"mha": {"num_heads": 4}, "gla": {"num_heads": 4}}) | kw
  return LanguageModel(**kw)


def _optimizer():
  # Clipping (a global reduction across shards), AdamW with the weight-decay mask (a
  # MaskedState in the opt state), as the training loop builds it.
  return optax.chain(optax.clip_by_global_norm(0.5),
                     optax.adamw(1e-2, weight_decay=0.1, mask=optim.decay_mask))


def _batch():
  rng = np.random.default_rng(0)
  targets = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
  targets[0, :5] = step_lib.IGNORE  # unequal scored-token counts across the batch shards
  return {"inputs": rng.integers(0, VOCAB, (B, T)).astype(np.int32), "targets": targets}


@pytest.fixture(scope="module")
def reference():
  """Initial state (host), then (state, metrics) of one single-device step (grad_accum=2)."""
  model, opt, batch = _model(), _optimizer(), _batch()
  state = state_lib.create_train_state(model, opt, jax.random.PRNGKey(1), batch)
  init = jax.device_get(state)  # before the step: it donates `state`
  new, metrics = step_lib.make_train_step(model, opt, grad_accum=2)(state, batch)
  return init, jax.device_get(new), jax.device_get(metrics)


# mesh config -> expected per-device shard shape of mha's q_proj kernel [D=32, H=4, 8] and of
# the MLP input kernel [32, 128]: (embed -> fsdp, heads / mlp -> tensor).
MODES = {
    "dp": ({"data": 8}, (32, 4, 8), (32, 128)),
    "fsdp": ({"fsdp": 8}, (4, 4, 8), (4, 128)),
    "tp": ({"data": 2, "tensor": 4}, (32, 1, 8), (32, 32)),
    "dp_fsdp_tp": ({"data": 2, "fsdp": 2, "tensor": 2}, (16, 2, 8), (16, 64)),
    # The sequence sharded: mha runs ring attention, gla state passing (shards of 4 and 2
    # tokens; the batch keeps data=2 inside the shard_maps).
    "dp_seq": ({"data": 2, "sequence": 4}, (32, 4, 8), (32, 128)),
    "seq": ({"sequence": 8}, (32, 4, 8), (32, 128)),
}
SLOW_MODES = ("seq",)


@pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW_MODES
                                  else m for m in MODES])
def test_sharded_step_equals_single_device(mode, reference):
  cfg, q_shard, mlp_shard = MODES[mode]
  init_ref, state_ref, metrics_ref = reference
  model, opt, batch = _model(), _optimizer(), _batch()
  mesh = mesh_lib.make_mesh(cfg)
  rules = mesh_lib.logical_rules(cfg)
  if mode == "dp_fsdp_tp":
    state, sh = sharding.create_sharded_train_state(model, opt, jax.random.PRNGKey(1), batch,
                                                    mesh, rules)
    # Sharded init draws the same values as the single-device init.
    assert_trees_rel_close(jax.device_get(state), init_ref, 0.0, name="init state")
  else:  # the sharded init compiles for seconds on the CPU; one mode checks it
    sh = sharding.state_shardings(model, opt, batch, mesh, rules)
    state = jax.device_put(init_ref, sh.state)

  q = state.params["block_0"]["mixer"]["q_proj"]["kernel"]
  wi = state.params["block_0"]["mlp"]["wi_up"]["kernel"]
  assert q.sharding.shard_shape(q.shape) == q_shard
  assert wi.sharding.shard_shape(wi.shape) == mlp_shard
  adam = state.opt_state[1][0]
  for moment in (adam.mu, adam.nu):  # the Adam moments follow their params
    m = moment["block_0"]["mixer"]["q_proj"]["kernel"]
    assert m.sharding.is_equivalent_to(q.sharding, q.ndim)
  assert adam.count.sharding.is_fully_replicated

  step = sharding.make_sharded_train_step(model, opt, mesh, rules, sh, grad_accum=2)
  placed = sharding.shard_batch(batch, mesh, rules)
  n_batch = cfg.get("data", 1) * cfg.get("fsdp", 1)  # batch -> ("data", "fsdp")
  n_seq = cfg.get("sequence", 1)  # seq -> "sequence"
  assert placed["inputs"].sharding.shard_shape((B, T)) == (B // n_batch, T // n_seq)
  if "sequence" in cfg:  # the sequence-parallel ops (shard_maps) are in the traced step
    assert str(jax.make_jaxpr(step)(state, placed)).count("shard_map") >= 2
  new, metrics = step(state, placed)
  assert new.params["block_0"]["mixer"]["q_proj"]["kernel"].sharding.is_equivalent_to(
      q.sharding, q.ndim)
  assert_rel_close(metrics["loss"], metrics_ref["loss"], RTOL, name="loss")
  assert_rel_close(metrics["grad_norm"], metrics_ref["grad_norm"], RTOL, name="grad_norm")
  assert_trees_rel_close(jax.device_get(new.params), state_ref.params, RTOL, name="params")
  assert_trees_rel_close(jax.device_get(new.opt_state), state_ref.opt_state, RTOL,
                         name="opt_state")
  assert int(new.step) == 1


def test_indivisible_dims_fall_back_to_replicated_and_table_says_so():
  # swiglu's default hidden round(8/3 · 32) = 85 divides no tensor size; vocab 62 does not
  # divide tensor=4.
  model = _model(mlp_ratio=None, vocab_size=62)
  mesh = mesh_lib.make_mesh({"fsdp": 2, "tensor": 4})
  rules = mesh_lib.logical_rules()
  sh = sharding.state_shardings(model, _optimizer(), _batch(), mesh, rules)
  wi = sh.state.params["block_0"]["mlp"]["wi_up"]["kernel"]
  assert tuple(wi.spec) == ("fsdp", None)
  assert "dim 1 (size 85) does not divide tensor=4" in sh.notes[
      "['block_0']['mlp']['wi_up']['kernel']"]
  assert tuple(sh.state.params["embed"]["embedding"].spec) == (None, "fsdp")
  abstract = jax.tree.map(lambda s, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          sh.state, jax.eval_shape(
                              lambda: state_lib.create_train_state(
                                  model, _optimizer(), jax.random.PRNGKey(0), _batch())))
  table = sharding.sharding_table(abstract, sh)
  line = next(l for l in table.splitlines() if l.startswith("['block_0']['mlp']['wi_up']"))
  assert "(32, 85)" in line and "('fsdp', None)" in line and "does not divide" in line
  assert "5.3 KiB" in line  # (32/2) · 85 · 4 bytes = 5440 B per device
  assert "per device" in table.splitlines()[-1]


def test_mesh_sharding_a_mixer_sequence_it_cannot_is_refused_before_compiling():
  # slstm's recurrence is nonlinear in its state: no state passing across shards.
  model = _model(mixer="mha,slstm", mixer_kwargs={"mha": {"num_heads": 4}})
  opt, batch = _optimizer(), _batch()
  mesh = mesh_lib.make_mesh({"data": 4, "sequence": 2})
  rules = mesh_lib.logical_rules()
  with pytest.raises(ValueError, match=r"sequence over sequence=2 .*'slstm' cannot run "
                                       r"with a sharded sequence\. Mixers that can: .*\bgla\b.*"
                                       r"\bmha\b"):
    sharding.state_shardings(model, opt, batch, mesh, rules)
  with pytest.raises(ValueError, match="'slstm' cannot"):
    sharding.make_sharded_train_step(model, opt, mesh, rules, None)
  # The supported pair passes the check.
  sharding.check_sequence_axis(_model(), mesh, rules)
  # A `sequence` axis the rules do not use for `seq` shards nothing: accepted.
  rules_no_seq = mesh_lib.logical_rules({"rules": [(k, v) for k, v in rules if k != "seq"]})
  sharding.check_sequence_axis(model, mesh, rules_no_seq)


def _loop_run(mesh, workdir):
  from experiments.configs import mqar as mqar_config  # pylint: disable=g-import-not-at-top
  from seqmix.train import loop  # pylint: disable=g-import-not-at-top

  c = mqar_config.get_config("smoke")
  c.train.update(steps=2, decay_steps=2, warmup_steps=1, ckpt_every=0, log_every=1,
                 eval_every=0, progress=False, tensorboard=False, batch_size=8)
  c.train.mesh = mesh
  c.data.num_train_examples = 16
  c.data.num_test_examples = 8
  losses = []
  model = _model(vocab_size=c.data.vocab_size, mixer="mha", n_layers=1)
  summary = loop.train(c, str(workdir), model=model,
                       hooks=[lambda s, m: losses.append(jax.device_get(m["loss"]))])
  return np.array(losses), summary


def test_train_loop_runs_sharded_when_a_mesh_is_configured(tmp_path, capsys):
  losses, summary = _loop_run({"data": 2, "fsdp": 2, "tensor": 2}, tmp_path)
  assert summary["step"] == 2 and losses.shape == (2,) and np.isfinite(losses).all()
  assert np.isfinite(summary["val"]["loss"])
  out = capsys.readouterr()
  assert "parameter shardings" in out.out + out.err  # the table is printed at start


@pytest.mark.slow
def test_sharded_train_loop_equals_single_device_loop(tmp_path):
  plain, summary_plain = _loop_run({}, tmp_path / "plain")
  sharded, summary = _loop_run({"data": 2, "fsdp": 2, "tensor": 2}, tmp_path / "sharded")
  assert_rel_close(sharded, plain, RTOL, name="train losses")
  assert_rel_close(summary["val"]["loss"], summary_plain["val"]["loss"], RTOL, name="val loss")
