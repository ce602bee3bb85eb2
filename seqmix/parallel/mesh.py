"""A device `Mesh` and logical-axis rules from a config (DESIGN.md, "Distribution").

A mesh config names the sizes of the four mesh axes (`data`, `fsdp`, `tensor`, `sequence`;
a missing axis has size 1, one axis may be −1 = all remaining devices), e.g.

    mesh: {data: 2, fsdp: -1, tensor: 1, sequence: 2}   # 8 devices -> data=2 fsdp=2 sequence=2

and optionally `axis_types` ("auto" or "explicit") and `rules`, the logical-axis rules as data:
pairs (logical name, mesh axis | tuple of mesh axes | None), defaulting to
`axes.DEFAULT_RULES`. Modules never see the rules; `logical_spec` turns logical names into a
`PartitionSpec` with them.

Axis types. jax 0.11's `jax.make_mesh` makes Explicit axes by default: arrays carry their
sharding in their types, shard_map inputs must already be sharded, and `jit` code that relies
on sharding propagation (`with_sharding_constraint`, logical annotations) needs Auto axes. The
default here is "auto" for that reason; the context-parallel functions of this package
reshard their inputs themselves on Explicit axes.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import Mesh

from seqmix.parallel import axes

_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def mesh_shape(config, n_devices):
  """Axis sizes {name: size} for `n_devices`, with one −1 filled; in `axes.MESH_AXES` order."""
  config = dict(config)
  unknown = set(config) - set(axes.MESH_AXES) - {"axis_types", "rules"}
  if unknown:
    raise ValueError(f"mesh config: unknown keys {sorted(unknown)}; the mesh axes are "
                     f"{axes.MESH_AXES} (plus 'axis_types' and 'rules').")
  sizes = {a: int(config.get(a, 1)) for a in axes.MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise ValueError(f"mesh config: sizes must be >= 1 or -1 (fill); got "
                     f"{ {a: sizes[a] for a in bad} }.")
  if len(fill) > 1:
    raise ValueError(f"mesh config: at most one axis may be -1 (fill); got {fill}.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if n_devices % fixed:
      raise ValueError(f"mesh config {sizes}: {n_devices} devices are not divisible by the "
                       f"product {fixed} of the fixed axes, so {fill[0]!r}=-1 cannot fill them.")
    sizes[fill[0]] = n_devices // fixed
  elif fixed != n_devices:
    raise ValueError(f"mesh config {sizes}: the axis sizes multiply to {fixed}, but there are "
                     f"{n_devices} devices; make them match or set one axis to -1.")
  return sizes


def make_mesh(config, devices=None):
  """A Mesh with axes ("data", "fsdp", "tensor", "sequence") from a dict / ConfigDict.

  Args:
    config: axis sizes (module docstring), optionally `axis_types`: "auto" (default) or
      "explicit".
    devices: the devices to use (default `jax.devices()`).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(config, len(devices))
  kind = dict(config).get("axis_types", "auto")
  if isinstance(kind, str):
    if kind not in _TYPES:
      raise ValueError(f"mesh config: axis_types={kind!r}; choose 'auto' or 'explicit'.")
    kind = _TYPES[kind]
  shape = tuple(sizes[a] for a in axes.MESH_AXES)
  types = (kind,) * len(shape)
  if len(devices) == len(jax.devices()):
    # jax.make_mesh orders the devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(shape, axes.MESH_AXES, axis_types=types, devices=devices)
  return Mesh(np.array(devices).reshape(shape), axes.MESH_AXES, axis_types=types)


def logical_rules(config=None):
  """The logical-axis rules of a mesh config (`rules`), default `axes.DEFAULT_RULES`.

  `rules` may be a sequence of (logical, mesh axes) pairs or a dict; mesh axes must be among
  `axes.MESH_AXES`. Returns a tuple of pairs (the form flax's logical partitioning takes).
  """
  rules = None if config is None else dict(config).get("rules")
  if rules is None:
    return tuple(axes.DEFAULT_RULES)
  pairs = tuple(rules.items()) if hasattr(rules, "items") else tuple(tuple(r) for r in rules)
  for logical, target in pairs:
    targets = target if isinstance(target, (tuple, list)) else (target,)
    wrong = [t for t in targets if t is not None and t not in axes.MESH_AXES]
    if wrong:
      raise ValueError(f"logical-axis rule {logical!r} -> {target!r}: {wrong} are not mesh "
                       f"axes {axes.MESH_AXES}.")
  return tuple((l, tuple(t) if isinstance(t, list) else t) for l, t in pairs)


def logical_spec(names, rules=None):
  """PartitionSpec for logical axis names (e.g. (axes.BATCH, axes.SEQ, axes.EMBED))."""
  return nn.logical_to_mesh_axes(names, logical_rules() if rules is None else rules)
