"""Mesh and logical-axis rules from a config."""

import jax
import ml_collections
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from seqmix.parallel import axes
from seqmix.parallel import mesh as mesh_lib


def test_fill_axis_from_config_dict():
  cfg = ml_collections.ConfigDict({"data": 2, "fsdp": -1, "sequence": 2})
  m = mesh_lib.make_mesh(cfg)
  assert m.axis_names == axes.MESH_AXES
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 1, "sequence": 2}
  assert all(t == AxisType.Auto for t in m.axis_types)


def test_explicit_axes_and_device_subset():
  m = mesh_lib.make_mesh({"sequence": 4, "axis_types": "explicit"}, devices=jax.devices()[:4])
  assert dict(m.shape)["sequence"] == 4
  assert all(t == AxisType.Explicit for t in m.axis_types)


@pytest.mark.parametrize("cfg,match", [
    ({"data": -1, "fsdp": -1}, "at most one axis"),
    ({"data": 3}, "multiply to 3, but there are 8"),
    ({"data": 3, "fsdp": -1}, "not divisible by the product 3"),
    ({"data": 0}, "sizes must be >= 1"),
    ({"batch": 2}, "unknown keys"),
    ({"data": -1, "axis_types": "manual"}, "axis_types='manual'"),
])
def test_bad_configs(cfg, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.make_mesh(cfg)


def test_logical_rules_are_data():
  assert mesh_lib.logical_rules() == tuple(axes.DEFAULT_RULES)
  # An activation [batch, seq, embed]: fsdp already shards the batch, so embed stays whole
  # (a mesh axis is used once per array).
  assert mesh_lib.logical_spec((axes.BATCH, axes.SEQ, axes.EMBED)) == P(
      ("data", "fsdp"), "sequence", None)
  assert mesh_lib.logical_spec((axes.EMBED, axes.MLP)) == P("fsdp", "tensor")   # a weight
  rules = mesh_lib.logical_rules({"rules": {axes.BATCH: "data", axes.HEADS: "tensor"}})
  assert mesh_lib.logical_spec((axes.BATCH, axes.HEADS), rules) == P("data", "tensor")
  with pytest.raises(ValueError, match="not mesh axes"):
    mesh_lib.logical_rules({"rules": [(axes.BATCH, "model")]})
