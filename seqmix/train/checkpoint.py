"""Orbax checkpoints of the train state plus the data iterator's position.

Layout under `<workdir>/checkpoints/`:
  latest/<step>/  the last `keep` periodic checkpoints (async save).
  best/<step>/    the one checkpoint with the lowest validation loss so far.
Each step directory holds `state` (params, optimizer state, step, rng: orbax
StandardSave), `data` (the grain iterator's `get_state()`, JSON) and `meta` (JSON:
best validation loss so far, anything the loop wants back on resume).
Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save resumes from the previous complete checkpoint.

Sharded states: every process writes its own shards of `state` (orbax / tensorstore), and
`restore` reads them onto whatever shardings the target asks for, so a run saved on one mesh
resumes on another (fsdp=8 -> data=2 x fsdp=4, or onto a single device). `data` and `meta`
are written by the primary process only: the data state is the iterator's position, which is
the same on every process (each reads its own rows of the same global batches).
"""

import base64
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


def _to_json(data_state: Any) -> Any:
  # DataLoader iterators return bytes, dataset iterators a dict: both must survive JSON.
  if isinstance(data_state, (bytes, bytearray)):
    return {"__bytes__": base64.b64encode(bytes(data_state)).decode("ascii")}
  return data_state


def _from_json(obj: Any) -> Any:
  if isinstance(obj, dict) and set(obj) == {"__bytes__"}:
    return base64.b64decode(obj["__bytes__"])
  return obj


@jax.jit
def _finite(tree) -> jax.Array:
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def all_finite(tree) -> bool:
  """True if every floating leaf of `tree` is finite.

  Reduced on the devices (one jitted call, one scalar back), so a sharded tree is checked
  without gathering it and on every process of a multi-host run alike.
  """
  return bool(_finite(tree))


def abstract_like(tree):
  """The restore target of `tree`: each array -> ShapeDtypeStruct with its sharding.

  ShapeDtypeStructs (e.g. from `seqmix.parallel.sharding.abstract_train_state`, sharded for
  the mesh the run has now) pass through unchanged.
  """
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return ocp.utils.to_shape_dtype_struct(x)
  return jax.tree.map(one, tree)


class Checkpointer:
  """Periodic (keep-N) and best-by-validation-loss checkpoints of one run."""

  ITEMS = ("state", "data", "meta")

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    directory = os.path.abspath(directory)
    self.directory = directory
    self._latest = ocp.CheckpointManager(
        os.path.join(directory, "latest"), item_names=self.ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))
    self._best = ocp.CheckpointManager(
        os.path.join(directory, "best"), item_names=self.ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             enable_async_checkpointing=async_save))

  @staticmethod
  def _args(state, data_state, meta):
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(_to_json(data_state)),
                              meta=ocp.args.JsonSave(dict(meta)))

  def save(self, step: int, state, data_state, meta: dict) -> bool:
    """Periodic checkpoint at `step`; refuses (ValueError) a state with non-finite params."""
    if not all_finite(state.params):
      raise ValueError(f"Refusing to checkpoint step {step}: parameters are not finite.")
    return self._latest.save(int(step), args=self._args(state, data_state, meta), force=True)

  def save_best(self, step: int, state, data_state, meta: dict) -> bool:
    """Replace the best checkpoint (the caller decides that `step` improved)."""
    if not all_finite(state.params):
      raise ValueError(f"Refusing to checkpoint step {step}: parameters are not finite.")
    return self._best.save(int(step), args=self._args(state, data_state, meta), force=True)

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    return self._best.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._latest.all_steps())

  def restore(self, template_state, step: int | None = None, *, best: bool = False):
    """(state, data_state, meta) of `step` (default: newest).

    template_state: a TrainState of arrays or of ShapeDtypeStructs with shardings; the state
      comes back with its shapes, dtypes and shardings, whatever mesh it was saved from.
    """
    mgr = self._best if best else self._latest
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint under {mgr.directory}.")
    abstract = abstract_like(template_state)
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                    data=ocp.args.JsonRestore(),
                                                    meta=ocp.args.JsonRestore()))
    return out["state"], _from_json(out["data"]), dict(out["meta"])

  def wait(self):
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self):
    self._latest.close()
    self._best.close()
