"""Facts about every registered mixer, read from the registry and the op modules.

The family tree (`experiments.tree`) and the README feature table (`experiments.feature_table`)
draw from here, so the two never disagree:

  lineage():     every registered mixer and external ancestor as a `Node` (year, family,
                 parents, status).
  kernel_ops():  the ops a mixer runs (outside decoding) that have a built Pallas impl, read
                 from each op module's impl table (`_AVAILABLE` / `IMPLS`), not written by hand.
"""

import dataclasses
import functools
import importlib
import re

from seqmix import registry

# An op module's table of impls -> built?; the module-wide default is `_AVAILABLE` or `IMPLS`.
# Ops with a table of their own in a module that holds several:
_OWN_TABLE = {("attention", "attention"): "_ATTENTION_IMPLS",
              ("attention", "blockwise_attention"): "_BLOCKWISE_IMPLS",
              ("linear_attention", "rwkv6"): "_AVAILABLE_RWKV6"}
_DEFAULT_TABLES = ("_AVAILABLE", "IMPLS")
_OP_TOKEN = re.compile(r"\b([a-z_0-9]+)\.([a-z_0-9]+)\b")


@dataclasses.dataclass(frozen=True)
class Node:
  """One architecture of the family tree.

  external: an EXTERNAL_ANCESTORS entry (not implemented in seqmix).
  tested: registered, so tests/mixers/test_protocol.py (parametrised over `registry.names()`)
    runs it; False only for external ancestors.
  kernel: the ops of `kernel_ops`; empty for external ancestors.
  pattern: a layer pattern (griffin, xlstm) rather than one mixer class.
  """
  name: str
  year: int
  family: str
  parents: tuple[str, ...]
  paper: str
  external: bool = False
  tested: bool = False
  kernel: tuple[str, ...] = ()
  sequence_parallel: bool = False
  pattern: bool = False


def op_tokens(op: str, *, decode: bool = False) -> list[str]:
  """The `module.function` ops named in a registry `op` string, in order, without repeats.

  A `;`-separated part that says "(decode)" names the ops of single-token decoding only; it
  is left out unless `decode`.
  """
  out = []
  for part in op.split(";"):
    if "(decode)" in part and not decode:
      continue
    for mod, fn in _OP_TOKEN.findall(part):
      if f"{mod}.{fn}" not in out:
        out.append(f"{mod}.{fn}")
  return out


@functools.cache
def built_impls(token: str) -> tuple[str, ...]:
  """The built impls of op `module.function` (e.g. "linear_attention.gla").

  An op whose module has no impl table has a single form, reported as ("reference",). An op
  that does not exist raises, so a typo in a registry `op` string fails loudly.
  """
  mod_name, fn = token.split(".")
  try:
    mod = importlib.import_module(f"seqmix.ops.{mod_name}")
  except ModuleNotFoundError as e:
    raise ValueError(f"op {token!r}: there is no module seqmix.ops.{mod_name}; fix the "
                     f"registry `op` string.") from e
  if not callable(getattr(mod, fn, None)):
    raise ValueError(f"op {token!r}: seqmix.ops.{mod_name} has no function {fn!r}; fix the "
                     f"registry `op` string.")
  table_name = _OWN_TABLE.get((mod_name, fn))
  if table_name is None:
    table_name = next((t for t in _DEFAULT_TABLES if hasattr(mod, t)), None)
  if table_name is None:
    return ("reference",)
  return tuple(k for k, ok in getattr(mod, table_name).items() if ok)


def kernel_ops(info: registry.MixerInfo) -> tuple[str, ...]:
  """The ops of `info` (parallel form, not decode) that have a built impl="pallas"."""
  return tuple(t for t in op_tokens(info.op) if "pallas" in built_impls(t))


def decode_state(info: registry.MixerInfo) -> str:
  """'constant' (a fixed-size recurrent state) or 'KV cache' (grows with the context)."""
  return "constant" if info.constant_state else "KV cache"


def lineage() -> dict[str, Node]:
  """Every registered mixer and every external ancestor, by name."""
  nodes = {}
  for name in registry.names():
    info = registry.get(name)
    nodes[name] = Node(name=name, year=info.year, family=info.family, parents=info.parents,
                       paper=info.paper, tested=True, kernel=kernel_ops(info),
                       sequence_parallel=info.sequence_parallel, pattern=info.is_pattern)
  for name, a in registry.EXTERNAL_ANCESTORS.items():
    nodes[name] = Node(name=name, year=a.year, family=a.family, parents=a.parents,
                       paper=a.paper, external=True)
  return nodes
