"""experiments/sweep.py: cell keys, resume, OOM recording, one real tiny cell end to end."""

import dataclasses

import jax
import numpy as np
import pytest

from experiments import sweep


def _cells(lrs=(1e-3,), mixers=("mha",), extrapolate=(), n_layers=2, eval_lens=()):
  return sweep.grid(task="mqar", mixers=list(mixers), d_models=[16], seq_lens=[16], lrs=list(lrs),
                    steps=2, batch=4, train_examples=16, test_examples=8, n_layers=n_layers,
                    task_kwargs={"vocab_size": 64}, extrapolate=list(extrapolate),
                    eval_lens=list(eval_lens))


class FakeTrain:
  """Stands in for train_group: counts calls, optionally raises; returns plausible numbers."""

  def __init__(self, raise_if=None):
    self.calls = []
    self.raise_if = raise_if

  def __call__(self, cells, train_data, test_data, vocab_size, **kw):
    self.calls.append([c.lr for c in cells])
    if self.raise_if is not None:
      err = self.raise_if(cells)
      if err is not None:
        raise err
    n = len(cells)
    return sweep.GroupResult(
        accuracy={t: np.linspace(0.1, 0.9, n) for t in test_data}, eval_oom={},
        final_loss=np.ones(n), loss_curve=[(1, [2.0] * n), (2, [1.0] * n)], params=100,
        state_bytes=64, compiled_bytes=1000, compile_s=0.1, train_s=0.2, tokens_per_s=5.0,
        n_devices=1)


def test_keys_depend_on_every_field_and_group_ignores_lr():
  a, b = _cells(lrs=(1e-3, 3e-3))
  assert a.key != b.key and a.group == b.group
  (c,) = sweep.grid(task="mqar", mixers=["mha"], d_models=[16], seq_lens=[16], lrs=[1e-3],
                    steps=3, batch=4, train_examples=16, test_examples=8,
                    task_kwargs={"vocab_size": 64})
  assert c.key != a.key and c.group != a.group
  assert _cells()[0].key == a.key  # stable across calls
  assert _cells(eval_lens=(8,))[0].key != _cells()[0].key


def test_resume_skips_finished_cells(tmp_path):
  path = str(tmp_path / "r.jsonl")
  fake = FakeTrain()
  counts = sweep.run_grid(_cells(lrs=(1e-3, 3e-3)), path, train_fn=fake, progress=False)
  assert counts == {"ran": 2, "skipped": 0, "oom": 0, "error": 0}
  assert fake.calls == [[1e-3, 3e-3]]  # one group, lrs side by side
  counts = sweep.run_grid(_cells(lrs=(1e-3, 3e-3)), path, train_fn=fake, progress=False)
  assert counts["ran"] == 0 and counts["skipped"] == 2 and len(fake.calls) == 1
  # a grown grid runs only the new cell
  counts = sweep.run_grid(_cells(lrs=(1e-3, 3e-3, 1e-2)), path, train_fn=fake, progress=False)
  assert counts["ran"] == 1 and counts["skipped"] == 2 and fake.calls[-1] == [1e-2]
  records = sweep.load_results(path)
  assert len(records) == 3 and len({r["key"] for r in records}) == 3
  r = records[0]
  for field in ("config", "seed", "metrics", "wall_s", "params", "state_bytes", "peak_bytes",
                "compiled_bytes", "git_commit", "command"):
    assert field in r, field
  best = sweep.best_of_lrs(records)
  # the fake scores lrs of a call 0.1 ... 0.9: 3e-3 (0.9) beats 1e-3 (0.1) and 1e-2 (0.1)
  assert len(best) == 1 and best[0]["config"]["lr"] == 3e-3
  assert "0.900" in sweep.table(records)


def test_torn_last_line_is_ignored(tmp_path):
  path = tmp_path / "r.jsonl"
  sweep.run_grid(_cells(), str(path), train_fn=FakeTrain(), progress=False)
  with open(path, "a") as f:
    f.write('{"key": "abc", "sta')
  assert len(sweep.load_results(str(path))) == 1


def _oom(nbytes=123456789):
  return jax.errors.JaxRuntimeError(
      f"RESOURCE_EXHAUSTED: Out of memory while trying to allocate {nbytes} bytes.")


def test_oom_recorded_after_retrying_one_lr_at_a_time(tmp_path):
  path = str(tmp_path / "r.jsonl")
  # Both lrs together do not fit; 1e-3 alone does; 3e-3 alone does not.
  fake = FakeTrain(raise_if=lambda cells: _oom() if len(cells) > 1 or cells[0].lr == 3e-3
                   else None)
  counts = sweep.run_grid(_cells(lrs=(1e-3, 3e-3)), path, train_fn=fake, progress=False)
  assert fake.calls == [[1e-3, 3e-3], [1e-3], [3e-3]]
  assert counts == {"ran": 1, "skipped": 0, "oom": 1, "error": 0}
  by_lr = {r["config"]["lr"]: r for r in sweep.load_results(path)}
  assert by_lr[1e-3]["status"] == "ok"
  assert by_lr[3e-3]["status"] == "oom"
  assert by_lr[3e-3]["oom"]["bytes_requested"] == 123456789
  assert by_lr[3e-3]["oom"]["phase"] == "train"
  # an oom cell is final: not rerun
  again = sweep.run_grid(_cells(lrs=(1e-3, 3e-3)), path, train_fn=fake, progress=False)
  assert again["skipped"] == 2 and len(fake.calls) == 3


def test_other_errors_are_recorded_and_retried(tmp_path):
  path = str(tmp_path / "r.jsonl")
  bad = FakeTrain(raise_if=lambda cells: ValueError("broken mixer"))
  counts = sweep.run_grid(_cells(), path, train_fn=bad, progress=False)
  assert counts["error"] == 1
  (r,) = sweep.load_results(path)
  assert r["status"] == "error" and "broken mixer" in r["error"]
  # not an OOM: a non-RESOURCE_EXHAUSTED runtime error is an error too
  assert not sweep.is_oom(jax.errors.JaxRuntimeError("INTERNAL: something else"))
  counts = sweep.run_grid(_cells(), path, train_fn=FakeTrain(), progress=False)
  assert counts["ran"] == 1  # the errored cell is tried again
  assert sweep.best_of_lrs(sweep.load_results(path))[0]["status"] == "ok"


@pytest.mark.parametrize("message,expected", [
    ("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1234 bytes.", 1234),
    ("RESOURCE_EXHAUSTED: Failed to allocate request for 2.00GiB (2147483648B) on device", 2**31),
    ("RESOURCE_EXHAUSTED: Out of memory allocating 1.5GiB for the buffer", int(1.5 * 2**30)),
    ("RESOURCE_EXHAUSTED: Attempting to allocate 512.0M. That was not possible.", 512 * 2**20),
    ("RESOURCE_EXHAUSTED: out of memory", None),
])
def test_requested_bytes(message, expected):
  assert sweep.requested_bytes(message) == expected
  assert sweep.is_oom(jax.errors.JaxRuntimeError(message))


def test_parse_mixer():
  assert sweep.parse_mixer("mha") == ("mha", {})
  assert sweep.parse_mixer("mha:position=rope;num_heads=2") == (
      "mha", {"position": "rope", "num_heads": 2})
  with pytest.raises(ValueError, match="key=value"):
    sweep.parse_mixer("mha:rope")


def test_model_config_positions():
  (zoo,) = _cells()
  assert sweep.model_config(zoo, 64).pos_embedding == "learned"  # zoology's attention
  (nope,) = _cells(mixers=("mha:position=none",), extrapolate=(2,))
  m = sweep.model_config(nope, 64)
  assert m.pos_embedding == "none" and m.mixer_kwargs["mha"]["position"] == "none"  # NoPE
  (rope,) = _cells(mixers=("mha:position=rope",))
  assert sweep.model_config(rope, 64).pos_embedding == "none"


def test_model_config_cosformer_horizon_covers_longest_eval_length():
  (cell,) = _cells(mixers=("cosformer",), extrapolate=(2, 4), eval_lens=(8, 96))
  assert cell.eval_lengths == (8, 16, 32, 64, 96)
  assert sweep.model_config(cell, 64).mixer_kwargs["cosformer"]["max_len"] == 96
  (plain,) = _cells(mixers=("cosformer",))
  assert sweep.model_config(plain, 64).mixer_kwargs["cosformer"]["max_len"] == 16
  (wide,) = _cells(mixers=("cosformer:max_len=512",), extrapolate=(2,))
  assert sweep.model_config(wide, 64).mixer_kwargs["cosformer"]["max_len"] == 512
  (short,) = _cells(mixers=("cosformer:max_len=16",), extrapolate=(2,))
  with pytest.raises(ValueError, match="longest evaluation length 32"):
    sweep.model_config(short, 64)


def test_one_real_cell_with_extrapolation(tmp_path):
  """The real train_group on a 2-step, d_model 16 model: a full record, accuracy at T and 2T."""
  path = str(tmp_path / "r.jsonl")
  # one layer: compiling the vmapped training step dominates this test's time. Batch 8 over
  # the 8 simulated CPU devices (tests/conftest.py): the data-parallel path.
  (cell,) = _cells(mixers=("mha:position=rope",), extrapolate=(2,), n_layers=1, eval_lens=(8,))
  cell = dataclasses.replace(cell, batch=8)
  counts = sweep.run_grid([cell], path, devices=0, log_every=1, progress=False)
  assert counts["ran"] == 1, sweep.load_results(path)
  (r,) = sweep.load_results(path)
  m = r["metrics"]
  assert set(m["accuracy_by_len"]) == {"8", "16", "32"}
  assert all(0.0 <= v <= 1.0 for v in m["accuracy_by_len"].values())
  assert [s for s, _ in m["loss_curve"]] == [1, 2] and np.isfinite(m["final_loss"])
  assert r["params"] > 0 and r["compiled_bytes"] > 0 and r["train_s"] > 0
  assert r["n_devices"] == jax.device_count()
  # decode cache of one sequence at T=16: K and V of 1 layer, d_model 16, float32 (+ small
  # bookkeeping such as positions): at least 2 * 16 * 16 * 4 bytes
  assert r["state_bytes"] >= 2 * 16 * 16 * 4


def test_eval_oom_is_recorded_not_fatal(tmp_path):
  """Training fits, evaluation at 2T does not: accuracy at 2T is None and the oom is kept."""
  path = str(tmp_path / "r.jsonl")

  class EvalOOM(FakeTrain):
    def __call__(self, cells, train_data, test_data, vocab_size, **kw):
      res = super().__call__(cells, train_data, test_data, vocab_size, **kw)
      res.accuracy[32] = np.full(len(cells), np.nan)
      res.eval_oom[32] = sweep.oom_record(_oom(99), "eval T=32")
      return res

  sweep.run_grid(_cells(extrapolate=(2,)), path, train_fn=EvalOOM(), progress=False)
  (r,) = sweep.load_results(path)
  assert r["status"] == "ok" and r["metrics"]["accuracy_by_len"]["32"] is None
  assert r["metrics"]["accuracy"] is not None
  assert r["eval_oom"]["32"]["bytes_requested"] == 99
