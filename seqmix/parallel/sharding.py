"""Shardings of a TrainState and of a batch, and the sharded (jit) train step.

    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = mesh_lib.logical_rules()
    state, shardings = create_sharded_train_state(model, optimizer, rng, batch, mesh, rules)
    print(sharding_table(state, shardings))
    step = make_sharded_train_step(model, optimizer, mesh, rules, shardings)
    state, metrics = step(state, shard_batch(batch, mesh, rules))

Parameters carry logical axis names (`seqmix.parallel.axes.param`); the rules map them to mesh
axes. A dimension whose size does not divide the product of its mesh axes is replicated
instead (jit would refuse it), and the table says so. The optimizer state's shardings follow
the params' (`optax.tree_map_params`: Adam's mu / nu are sharded like their parameters; counts
are replicated). The step is `seqmix.train.step.make_train_step` jitted with in/out shardings,
the state donated, so the same maths runs on one device or on any mesh.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from seqmix import registry
from seqmix.parallel import axes
from seqmix.parallel import context
from seqmix.train import state as state_lib
from seqmix.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class StateShardings:
  """The NamedShardings of a TrainState and why some dimensions are not sharded.

  state: a TrainState of NamedShardings (step and rng replicated).
  notes: parameter path (`jax.tree_util.keystr`) -> why its spec differs from what the rules
    alone give (an indivisible dimension, or a parameter without logical axis names).
  """
  state: Any
  notes: dict


def _is_box(x):
  return isinstance(x, nn.meta.AxisMetadata)


def _mesh_size(mesh, target) -> int:
  targets = target if isinstance(target, tuple) else (target,)
  return math.prod(mesh.shape[a] for a in targets if a is not None)


def _leaf_spec(path, box, mesh, rules, notes):
  """The mesh PartitionSpec of one (boxed or plain) abstract parameter, with fallbacks."""
  key = jax.tree_util.keystr(path)
  if not isinstance(box, nn.LogicallyPartitioned) and not isinstance(box, nn.Partitioned):
    notes[key] = "no logical axis names: replicated"
    return P()
  shape = box.unbox().shape
  names = tuple(box.names)
  if isinstance(box, nn.LogicallyPartitioned):
    spec = tuple(nn.logical_to_mesh_axes(names, rules))
  else:  # already mesh axes
    spec = names
  spec = spec + (None,) * (len(shape) - len(spec))
  out = []
  for dim, (size, target) in enumerate(zip(shape, spec)):
    n = _mesh_size(mesh, target) if target is not None else 1
    if target is not None and size % n:
      notes[key] = (notes.get(key, "") + ("; " if key in notes else "")
                    + f"dim {dim} (size {size}) does not divide {target}={n}: replicated")
      target = None
    out.append(target)
  return P(*out)


def param_shardings(abstract_params, mesh, rules):
  """NamedShardings of a (boxed, abstract) param tree; returns (shardings, notes).

  abstract_params: the params of `model.init` (e.g. from `jax.eval_shape`), still boxed in
    flax's logical-partitioning metadata.
  """
  notes = {}
  specs = jax.tree_util.tree_map_with_path(
      lambda p, b: _leaf_spec(p, b, mesh, rules, notes), abstract_params, is_leaf=_is_box)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P)), notes


def batch_sharding(mesh, rules):
  """NamedSharding of a [B, T] batch array: batch over the rules' `batch` axes, T over `seq`."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes((axes.BATCH, axes.SEQ), rules))


def shard_batch(batch: dict, mesh, rules) -> dict:
  """Puts every [B, T] array of `batch` on the mesh (B must divide the batch axes' size)."""
  sharding = batch_sharding(mesh, rules)
  n = _mesh_size(mesh, sharding.spec[0]) if sharding.spec and sharding.spec[0] else 1
  out = {}
  for k, v in batch.items():
    if np.shape(v)[0] % n:
      raise ValueError(f"batch[{k!r}] has {np.shape(v)[0]} rows, not divisible by the "
                       f"{n} devices of the batch mesh axes {sharding.spec[0]}; make the batch "
                       f"size a multiple of {n}.")
    out[k] = jax.device_put(jnp.asarray(v), sharding)
  return out


def check_sequence_axis(model, mesh, rules) -> None:
  """Refuses, before anything compiles, a mesh that shards the sequence of a mixer that can't.

  The sequence is sharded when the rules map `seq` to mesh axes of total size > 1. Every
  layer's mixer must then have `sequence_parallel` in the registry (its ops go through
  `seqmix.parallel.dispatch`, verified in tests/parallel/test_sp_mixers.py).
  """
  target = dict(rules).get(axes.SEQ)
  n = _mesh_size(mesh, target) if target is not None else 1
  if n <= 1:
    return
  layers = model.layer_mixers()
  bad = sorted({m for m in layers if m != "none" and not registry.get(m).sequence_parallel})
  if "rwkv_channel_mix" in (getattr(model, "mlp", None), getattr(model, "shared_mlp", None)):
    bad.append("mlp='rwkv_channel_mix' (token shift)")
  if bad:
    ok = [m for m in registry.names(include_patterns=False) if registry.get(m).sequence_parallel]
    raise ValueError(
        f"The mesh shards the sequence over {target}={n} devices (rule {axes.SEQ!r} -> "
        f"{target!r}), but {', '.join(repr(b) if ' ' not in b else b for b in bad)} cannot "
        f"run with a sharded sequence. Mixers that can: {', '.join(ok) if ok else 'none yet'}. "
        f"Set the mesh's 'sequence' axis to 1 (e.g. move those devices to 'data' or 'fsdp').")


def _abstract_params(model, batch):
  tokens = jax.ShapeDtypeStruct((1,) + tuple(np.shape(batch["inputs"])[1:]), jnp.int32)
  return jax.eval_shape(
      lambda r, x: model.init({"params": r, "dropout": r}, x, deterministic=True)["params"],
      jax.random.PRNGKey(0), tokens)


def state_shardings(model, optimizer: optax.GradientTransformation, batch, mesh,
                    rules) -> StateShardings:
  """The shardings of the TrainState `create_train_state(model, optimizer, rng, batch)` makes.

  Raises ValueError (check_sequence_axis) when the mesh shards the sequence of a mixer that
  cannot run so.
  """
  check_sequence_axis(model, mesh, rules)
  boxed = _abstract_params(model, batch)
  params_sh, notes = param_shardings(boxed, mesh, rules)
  params = nn.meta.unbox(boxed)
  opt_abstract = jax.eval_shape(optimizer.init, params)
  replicated = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(
      optimizer, lambda _, s: s, opt_abstract, params_sh,
      transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, NamedSharding))
  # optax.tree_map_params keeps the opt-state leaves where a param tree is absent (MaskedNode);
  # any abstract array left over is a non-param leaf.
  opt_sh = jax.tree.map(lambda s: s if isinstance(s, NamedSharding) else replicated, opt_sh,
                        is_leaf=lambda x: isinstance(x, NamedSharding))
  state = state_lib.TrainState(step=replicated, params=params_sh, opt_state=opt_sh,
                               rng=replicated)
  return StateShardings(state=state, notes=notes)


def _create_fn(model, optimizer):
  def create(rng, tokens):
    init_rng, step_rng = jax.random.split(rng)
    params = nn.meta.unbox(
        model.init({"params": init_rng, "dropout": init_rng}, tokens,
                   deterministic=True)["params"])
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=optimizer.init(params), rng=step_rng)
  return create


def _tokens_like(batch):
  return jax.ShapeDtypeStruct((1,) + tuple(np.shape(batch["inputs"])[1:]), jnp.int32)


def create_sharded_train_state(model, optimizer, rng, batch, mesh, rules):
  """`create_train_state`'s state, initialised directly sharded; returns (state, shardings).

  The same values as `seqmix.train.state.create_train_state` (same rng splits; jax's
  partitionable threefry makes random values independent of the sharding), but each device
  only ever holds its shards.
  """
  shardings = state_shardings(model, optimizer, batch, mesh, rules)
  tokens = jnp.zeros(_tokens_like(batch).shape, jnp.int32)
  state = jax.jit(_create_fn(model, optimizer), out_shardings=shardings.state)(rng, tokens)
  return state, shardings


def abstract_train_state(model, optimizer, batch, shardings: StateShardings):
  """The TrainState `create_sharded_train_state` would make, as ShapeDtypeStructs with its
  shardings: the target to restore a checkpoint onto this mesh (nothing is allocated)."""
  shapes = jax.eval_shape(_create_fn(model, optimizer), jax.random.PRNGKey(0),
                          _tokens_like(batch))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings.state)


def global_batch(local_batch: dict, sharding) -> dict:
  """This process's rows of a batch -> global arrays sharded by `sharding` (the batch one).

  local_batch: dict of [B/P, T] host arrays, P = jax.process_count() (the data pipeline gives
    each process its own rows); on one process, the whole batch.
  Each process puts only its own rows on its own devices
  (`jax.make_array_from_process_local_data`); the global array is [B, T], process p's rows
  at [p·B/P, (p+1)·B/P). Integer arrays are narrowed on the host to jax's canonical dtype
  (int64 -> int32 without x64), so no conversion op runs per batch.
  """
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    v = v.astype(jax.dtypes.canonicalize_dtype(v.dtype), copy=False)
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


def make_sharded_train_step(model, optimizer, mesh, rules, shardings: StateShardings, *,
                            grad_accum: int = 1, schedule=None, context_parallel: str = "ring"):
  """`make_train_step`'s step jitted with in/out shardings; the state is donated.

  When the rules shard `seq` over a mesh axis of size > 1, the step is traced inside
  `seqmix.parallel.context.sequence_parallel`, so every mixer runs the sequence-parallel form
  of its op (ring or all-gather attention as `context_parallel` says; state passing for the
  recurrent ops; a halo for short convolutions).

  Returns `train_step(state, batch) -> (state, metrics)`; `state` as `shardings` says, `batch`
  a dict of [B, T] arrays (sharded by `shard_batch`, or host arrays jit will place); metrics
  replicated.
  """
  check_sequence_axis(model, mesh, rules)
  step = step_lib.make_train_step(model, optimizer, grad_accum=grad_accum, schedule=schedule,
                                  jit=False)
  ctx = context.from_rules(mesh, rules, context_parallel=context_parallel)  # checks the args

  def traced(state, batch):
    # The block acts while jit traces this function (a fresh one per call here).
    with context.sequence_parallel(mesh, rules, context_parallel=ctx.context_parallel):
      return step(state, batch)

  replicated = NamedSharding(mesh, P())
  return jax.jit(traced, in_shardings=(shardings.state, batch_sharding(mesh, rules)),
                 out_shardings=(shardings.state, replicated), donate_argnums=(0,))


def _fmt_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def sharding_table(state, shardings: StateShardings | None = None) -> str:
  """A text table of the params' shardings: path, shape, spec, bytes per device, note.

  state: a TrainState of sharded arrays (or any tree with `.params` of jax.Arrays).
  shardings: its StateShardings, for the notes on replicated fallbacks.
  The last lines total the params and the optimizer state per device.
  """
  notes = {} if shardings is None else shardings.notes
  rows = [("parameter", "shape", "spec", "bytes/device", "note")]

  def per_device(x):
    shard = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") else x.shape
    return math.prod(shard) * x.dtype.itemsize

  total = dev = 0
  for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    key = jax.tree_util.keystr(path)
    spec = x.sharding.spec if isinstance(getattr(x, "sharding", None), NamedSharding) else P()
    b = per_device(x)
    total += x.size * x.dtype.itemsize
    dev += b
    rows.append((key, str(tuple(x.shape)), str(tuple(spec)), _fmt_bytes(b), notes.get(key, "")))
  opt_dev = sum(per_device(x) for x in jax.tree.leaves(state.opt_state) if hasattr(x, "dtype"))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + ("  " + r[4] if r[4] else "")
           for r in rows]
  lines.insert(1, "-" * len(lines[0]))
  lines.append(f"params: {_fmt_bytes(total)} in all, {_fmt_bytes(dev)} per device; "
               f"optimizer state: {_fmt_bytes(opt_dev)} per device")
  return "\n".join(lines)
