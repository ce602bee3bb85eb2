"""Which sequence-parallel form the mixers trace: a context set around the traced step.

Mixers call their ops through `seqmix.parallel.dispatch`. Outside a `sequence_parallel(...)`
block (or when its mesh's sequence axis has size 1) `active()` is None and dispatch calls the
op itself: the single-device path is the op call it always was, decided once in Python at
trace time, with nothing added to the compiled program. Inside the block the same mixer code
traces the shard_map'd form of its op (`seqmix.parallel.sequence_parallel`, ring attention).

    with context.sequence_parallel(mesh, rules, context_parallel="ring"):
      y = jax.jit(lambda p, x: model.apply(p, x))(params, x)   # traced here: sharded ops

The block must be active while jit TRACES (not when a compiled function runs): jit caches a
trace per function, so a function traced outside the block keeps its single-device ops. The
sharded train step (`seqmix.parallel.sharding.make_sharded_train_step`) jits a fresh function
that enters the block itself, so it always traces the sequence-parallel form.
"""

import contextlib
import contextvars
import dataclasses
import math
from typing import Any

from seqmix.parallel import axes

CONTEXT_PARALLEL = ("ring", "allgather")

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("seqmix_sequence_parallel", default=None)


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
  """The mesh and axes the sequence-parallel ops run on.

  mesh: the jax Mesh. axis_name: its axis the sequence is split over.
  batch_axes / head_axes: mesh axes (a name, a tuple of names, or None) of the batch and the
    head dims, from the logical rules; `batch_spec` / `head_spec` drop them for a dim they do
    not divide (that dim is then replicated inside the shard_map).
  context_parallel: "ring" or "allgather" for softmax attention.
  load_balance: zig-zag layout for causal attention without a window.
  backward: ring attention's backward ("autodiff" or "ring").
  """
  mesh: Any
  axis_name: str = "sequence"
  batch_axes: Any = None
  head_axes: Any = None
  context_parallel: str = "ring"
  load_balance: bool = True
  backward: str = "autodiff"

  @property
  def size(self) -> int:
    return self.mesh.shape[self.axis_name]

  def _fit(self, target, *dims):
    if target is None:
      return None
    names = target if isinstance(target, tuple) else (target,)
    names = tuple(a for a in names if a in self.mesh.shape and self.mesh.shape[a] > 1)
    if not names:
      return None
    n = math.prod(self.mesh.shape[a] for a in names)
    if any(d % n for d in dims):
      return None
    return names if len(names) > 1 else names[0]

  def batch_spec(self, batch_size):
    """Mesh axes for a batch dim of `batch_size` inside the shard_map (None: replicated)."""
    return self._fit(self.batch_axes, batch_size)

  def head_spec(self, *head_counts):
    """Mesh axes for head dims of these sizes (all must divide; else None: replicated)."""
    return self._fit(self.head_axes, *head_counts)


def _target(rules, name):
  return dict(rules).get(name)


def from_rules(mesh, rules=None, *, context_parallel="ring", load_balance=True,
               backward="autodiff") -> SequenceParallel:
  """The SequenceParallel of a mesh and logical rules: `seq` -> the axis, batch / heads too."""
  rules = tuple(axes.DEFAULT_RULES) if rules is None else rules
  if context_parallel not in CONTEXT_PARALLEL:
    raise ValueError(f"context_parallel={context_parallel!r}: choose one of {CONTEXT_PARALLEL}.")
  seq = _target(rules, axes.SEQ)
  if isinstance(seq, (tuple, list)):
    live = [a for a in seq if mesh.shape.get(a, 1) > 1]
    if len(live) > 1:
      raise ValueError(f"logical rule {axes.SEQ!r} -> {tuple(seq)}: the sequence can be split "
                       f"over one mesh axis only; map {axes.SEQ!r} to a single axis.")
    seq = live[0] if live else seq[0]
  if seq is None:
    seq = "sequence"
  return SequenceParallel(mesh=mesh, axis_name=seq, batch_axes=_target(rules, axes.BATCH),
                          head_axes=_target(rules, axes.HEADS),
                          context_parallel=context_parallel, load_balance=load_balance,
                          backward=backward)


@contextlib.contextmanager
def sequence_parallel(mesh, rules=None, **kwargs):
  """Within the block, mixers traced run their ops sequence-parallel on `mesh` (see module).

  kwargs: `from_rules`'s (context_parallel, load_balance, backward). A mesh whose sequence
  axis has size 1 (or lacks it) makes the block a no-op.
  """
  ctx = from_rules(mesh, rules, **kwargs)
  token = _ACTIVE.set(ctx if ctx.axis_name in mesh.shape and ctx.size > 1 else None)
  try:
    yield ctx
  finally:
    _ACTIVE.reset(token)


def active() -> SequenceParallel | None:
  """The SequenceParallel being traced under, or None (single-device ops)."""
  return _ACTIVE.get()
