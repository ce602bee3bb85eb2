"""shard_map plumbing shared by the context-parallel functions."""

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding


def reshard(x, mesh, spec):
  """x onto NamedSharding(mesh, spec) when the mesh has Explicit axes (shard_map needs it).

  On Auto axes shard_map inserts the resharding itself, so x is returned unchanged.
  """
  if any(t == AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))
  return x


def check_axis(mesh, axis_name, what):
  if axis_name not in mesh.shape:
    raise ValueError(f"{what}: the mesh has axes {tuple(mesh.shape)}, not {axis_name!r}; pass "
                     f"axis_name= or build the mesh with that axis.")
  return mesh.shape[axis_name]


def smap(fn, mesh, args, specs, out_specs):
  """Run fn(*args) under shard_map; None args are passed through as None (no spec needed).

  check_vma=False: the ops' scans start from plain `jnp.zeros` carries that shard_map's
  varying-manual-axes check rejects (their carries become device-varying in the loop).
  """
  keep = [j for j, a in enumerate(args) if a is not None]

  def local(*present):
    full = [None] * len(args)
    for j, a in zip(keep, present):
      full[j] = a
    return fn(*full)

  present = [reshard(args[j], mesh, specs[j]) for j in keep]
  f = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs[j] for j in keep),
                    out_specs=out_specs, check_vma=False)
  return f(*present)
