"""Mixers under a sequence-sharded mesh equal their single-device forward (outputs and grads).

Every mixer whose registry entry says `sequence_parallel=True` is run inside
`seqmix.parallel.context.sequence_parallel` on a data=2 × sequence=4 mesh (T = 16: shard edges
at 4, 8, 12) and compared with the plain forward at float32 rtol 1e-5: the output and the
gradients of a random projection of it w.r.t. every parameter and the input. The traced
program must contain a shard_map (the sequence-parallel op really ran). Packed documents put
a boundary exactly on the shard edge t = 8 and one inside a shard (t = 5, row 0). The default
suite runs gla with documents; every other case (all supported mixers, with and without
documents: without them the short convs take the sequence-parallel halo path) is `slow`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import registry
from seqmix.mixers import testing as mt
from seqmix.parallel import context
from seqmix.parallel import mesh as mesh_lib
from seqmix.testing import assert_rel_close
from seqmix.testing import assert_trees_rel_close

B, T = 2, 16
RTOL = 1e-5
SLOW = pytest.mark.slow

# Per-mixer overrides for these tests. Inside shard_map the ops must not take
# lax.associative_scan (its jitted grad there crashed the CPU backend): selective_scan's chunked
# form uses it, so Mamba runs its reference scan.
OVERRIDES = {
    "mamba": {"impl": "reference"},
}

# The default suite keeps one mixer (CPU shard_map compiles take tens of seconds each);
# test_sharded_step's dp_seq step covers mha's ring attention with gla by default.
DEFAULT = ("gla",)


def _segments():
  seg = np.zeros((B, T), np.int32)
  seg[:, 8:] = 1        # a document starts exactly on the shard edge t = 8
  seg[0, 5:8] = 7       # and one inside the first shard pair (row 0)
  return jnp.asarray(seg)


def _mesh():
  return mesh_lib.make_mesh({"data": 2, "sequence": 4})


def _supported():
  return [n for n in registry.names(include_patterns=False) if registry.get(n).sequence_parallel]


def check_mixer(name, segment_ids=None, mesh=None, **ctx_kwargs):
  module = mt.build(name, **OVERRIDES.get(name, {}))
  x = mt.random_inputs(0, B, T, module.d_model)
  params = mt.random_params(module, x, seed=1)
  cot = mt.random_inputs(2, B, T, module.d_model)

  # segment_ids is an argument, as in a train step's batch: captured as a closure constant,
  # XLA's SPMD partitioner (CPU, jax 0.11.2) lost the resets computed from it on the shard
  # edge (constant folding of the shifted ids under the sequence sharding).
  def fwd(p, x, s):
    return module.apply({"params": p}, x, segment_ids=s)[0]

  def loss(p, x, s):
    return jnp.sum(fwd(p, x, s) * cot)

  args = (params, x, segment_ids)
  # Fresh lambdas per jit: jit caches traces per function, and the context acts at trace time.
  y_ref = jax.jit(lambda *a: fwd(*a))(*args)
  g_ref = jax.jit(lambda *a: jax.grad(loss, argnums=(0, 1))(*a))(*args)
  with context.sequence_parallel(mesh or _mesh(), **ctx_kwargs):
    assert "shard_map" in str(jax.make_jaxpr(fwd)(*args)), (
        f"{name}: no shard_map in the traced forward; the sequence-parallel op did not run")
    y = jax.jit(lambda *a: fwd(*a))(*args)
    g = jax.jit(lambda *a: jax.grad(loss, argnums=(0, 1))(*a))(*args)
  assert_rel_close(y, y_ref, RTOL, name=f"{name} output")
  assert_trees_rel_close(g, g_ref, RTOL, name=f"{name} grads")


def _cases():
  out = []
  for name in _supported():
    for seg in (False, True):
      default = name in DEFAULT and seg
      out.append(pytest.param(name, seg, id=f"{name}-{'seg' if seg else 'plain'}",
                              marks=() if default else SLOW))
  return out


@pytest.mark.parametrize("name,segments", _cases())
def test_mixer_sequence_parallel_equals_single_device(name, segments):
  check_mixer(name, _segments() if segments else None)


@SLOW
def test_mha_allgather_context_parallel():
  check_mixer("mha", _segments(), context_parallel="allgather")


def test_no_context_or_size_one_sequence_axis_traces_no_shard_map():
  module = mt.build("gla")
  x = mt.random_inputs(0, B, T, module.d_model)
  params = mt.random_params(module, x, seed=1)
  fwd = lambda p, x: module.apply({"params": p}, x)[0]
  assert "shard_map" not in str(jax.make_jaxpr(fwd)(params, x))
  with context.sequence_parallel(mesh_lib.make_mesh({"data": 8})):
    assert context.active() is None
    assert "shard_map" not in str(jax.make_jaxpr(fwd)(params, x))
  assert context.active() is None
