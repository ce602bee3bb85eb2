"""Multi-process plumbing on one process: when jax.distributed.initialize() is called, the
mesh a multi-process run falls back to, per-process data shards and the global batch.

Nothing here starts a second process or calls the real `jax.distributed.initialize()` (the
tests' process has touched its devices long before); a real multi-host run is not tested.
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seqmix.data import pipeline
from seqmix.parallel import distributed
from seqmix.parallel import mesh as mesh_lib
from seqmix.parallel import sharding
from seqmix.train import config as config_lib
from seqmix.train import loop

TPU_POD = {"TPU_WORKER_HOSTNAMES": "t1-w-0,t1-w-1,t1-w-2,t1-w-3"}


@pytest.mark.parametrize("mode,env,want", [
    ("auto", {}, False),                                   # one process: laptop, 8-GPU host
    ("auto", {"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # single-host TPU VM
    ("auto", TPU_POD, True),
    ("auto", {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ("auto", {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16"}, True),
    ("auto", {"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ("off", TPU_POD, False),
    ("on", {}, True),
    ("AUTO", {}, False),
])
def test_should_initialize(mode, env, want):
  assert distributed.should_initialize(mode, env) is want


def test_unknown_mode_is_refused():
  with pytest.raises(ValueError, match="train.distributed='yes'; choose one of"):
    distributed.should_initialize("yes", {})


def test_initialize_kwargs_from_env():
  env = {"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3", "JAX_COORDINATOR_ADDRESS": "h:1"}
  # the coordinator address jax reads itself
  assert distributed.initialize_kwargs(env) == {"num_processes": 4, "process_id": 3}


def test_initialize_calls_jax_only_when_asked(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  assert distributed.initialize("auto", {}) is False and not calls
  assert distributed.initialize("off", TPU_POD) is False and not calls
  jax.devices()  # the backend is up: too late to initialise, and the error says so
  with pytest.raises(RuntimeError, match="before anything else touches jax devices"):
    distributed.initialize("auto", TPU_POD)
  assert not calls
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
  assert distributed.initialize("on", {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})
  assert calls == [{"num_processes": 2, "process_id": 1}]


def test_config_refuses_unknown_distributed_mode():
  from experiments.configs import mqar as mqar_config  # pylint: disable=g-import-not-at-top
  c = mqar_config.get_config("smoke")
  c.train.distributed = "maybe"
  with pytest.raises(config_lib.ConfigError, match="train.distributed='maybe'"):
    config_lib.validate(c, check_model=False)


def test_mesh_from_config_and_data_parallel_for_several_processes(monkeypatch):
  t = config_lib.train_defaults()
  assert loop.mesh_config(t) == {}  # no axis set: one device
  t.mesh.fsdp = 8  # what --config.train.mesh.fsdp=8 sets
  assert loop.mesh_config(t) == {"fsdp": 8, "axis_types": "auto"}
  t = config_lib.train_defaults()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert loop.mesh_config(t) == {"data": -1}
  t.mesh = {"fsdp": -1}
  assert loop.mesh_config(t) == {"fsdp": -1}


def _mqar_cfg():
  from experiments.configs import mqar as mqar_config  # pylint: disable=g-import-not-at-top
  c = mqar_config.get_config("smoke")
  c.data.num_train_examples = 64
  c.data.num_test_examples = 16
  return c


@pytest.mark.parametrize("source", ["mqar", "tinyshakespeare"])
def test_two_processes_read_disjoint_rows_that_cover_the_global_batch(source, request):
  c = _mqar_cfg()
  data_cfg, seq_len = c.data, int(c.train.seq_len)
  if source == "tinyshakespeare":
    request.getfixturevalue("tinyshakespeare_path")
    data_cfg, seq_len = {"name": "tinyshakespeare"}, 16
  kw = {"seq_len": seq_len, "batch_size": 8, "seed": 0}
  whole = pipeline.make_datasets(data_cfg, process_index=0, process_count=1, **kw)
  shards = [pipeline.make_datasets(data_cfg, process_index=p, process_count=2, **kw)
            for p in range(2)]
  for _ in range(3):
    want = next(whole.train)
    got = [next(s.train) for s in shards]
    rows = [[tuple(r) + tuple(t) for r, t in zip(g["inputs"], g["targets"])] for g in got]
    assert all(g["inputs"].shape == (4, seq_len) for g in got)
    assert not set(rows[0]) & set(rows[1])  # disjoint
    assert sorted(rows[0] + rows[1]) == sorted(  # together: the one-process global batch
        tuple(r) + tuple(t) for r, t in zip(want["inputs"], want["targets"]))


def test_global_batch_on_one_process_is_the_batch_sharded():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  rules = mesh_lib.logical_rules()
  sh = sharding.batch_sharding(mesh, rules)
  rng = np.random.default_rng(0)
  local = {"inputs": rng.integers(0, 9, (8, 4)), "targets": rng.integers(0, 9, (8, 4))}
  out = sharding.global_batch(local, sh)  # process_count 1: the local rows are all rows
  for k, v in local.items():
    assert out[k].dtype == np.int32  # narrowed on the host (int64 without x64)
    assert out[k].sharding.is_equivalent_to(sh, 2)
    assert out[k].sharding.shard_shape(out[k].shape) == (1, 4)
    np.testing.assert_array_equal(jax.device_get(out[k]), v)
  assert out["inputs"].sharding == NamedSharding(mesh, P(("data", "fsdp"), "sequence"))
