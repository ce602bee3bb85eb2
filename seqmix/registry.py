"""ONE registry: mixer name -> Linen class + metadata.

A mixer file registers its class with `@register(...)`; layer patterns (Griffin, xLSTM)
register with `register_pattern(...)`. Lookups import every module under
`seqmix.mixers` once, so `names()` is complete whatever was imported before.

    @register("mha", paper="Attention Is All You Need", year=2017, venue="NeurIPS",
              family="attention", op="attention", parents=(), constant_state=False)
    class MHA(MixerBase): ...
"""

import dataclasses
import difflib
import importlib
import pkgutil
from typing import Any, Callable

FAMILIES = ("attention", "linear-attention", "ssm", "linear-rnn", "nonlinear-rnn",
            "ttt", "long-conv", "memory", "mlp-mixer", "hybrid")


@dataclasses.dataclass(frozen=True)
class Ancestor:
  """An architecture a registered mixer builds on that seqmix does not implement.

  name: the key `parents` entries use.
  paper, year: the paper that introduced it (the year of its first public version).
  family: the FAMILIES lane the family tree draws it in.
  parents: its own ancestors (other external ancestors or registered mixers).
  """
  name: str
  paper: str
  year: int
  family: str
  parents: tuple[str, ...] = ()


# The only names besides registered mixers that a `parents` entry may use: a lineage ends in a
# paper, not in a typo. `lineage_errors()` (and tests/test_registry.py) enforce it.
EXTERNAL_ANCESTORS: dict[str, Ancestor] = {a.name: a for a in (
    Ancestor("rnn", "Finding Structure in Time (Elman)", 1990, "nonlinear-rnn"),
    Ancestor("fast_weights", "Learning to Control Fast-Weight Memories (Schmidhuber)", 1992,
             "linear-attention"),
    Ancestor("lstm", "Long Short-Term Memory", 1997, "nonlinear-rnn", ("rnn",)),
    Ancestor("gru", "Learning Phrase Representations using RNN Encoder-Decoder", 2014,
             "nonlinear-rnn", ("lstm",)),
    Ancestor("mqa", "Fast Transformer Decoding: One Write-Head is All You Need", 2019,
             "attention", ("mha",)),
    Ancestor("hippo", "HiPPO: Recurrent Memory with Optimal Polynomial Projections", 2020,
             "ssm"),
    Ancestor("lssl", "Combining Recurrent, Convolutional, and Continuous-time Models with "
             "Linear State-Space Layers", 2021, "ssm", ("hippo",)),
    Ancestor("mlp_mixer", "MLP-Mixer: An all-MLP Architecture for Vision", 2021, "mlp-mixer",
             ("mha",)),
    Ancestor("gau", "Transformer Quality in Linear Time (FLASH)", 2022, "attention",
             ("mha",)),
    Ancestor("ckconv", "CKConv: Continuous Kernel Convolution For Sequential Data", 2021,
             "long-conv", ("wavenet",)),
    Ancestor("monarch", "Monarch: Expressive Structured Matrices for Efficient and Accurate "
             "Training", 2022, "long-conv"),
    Ancestor("s2mlp", "S²-MLP: Spatial-Shift MLP Architecture for Vision", 2021, "long-conv",
             ("mlp_mixer",)),
    Ancestor("wavenet", "WaveNet: A Generative Model for Raw Audio", 2016, "long-conv"),
)}


@dataclasses.dataclass(frozen=True)
class MixerInfo:
  """What the registry knows of one mixer.

  name: registry key (lower case, config value).
  cls: the Linen class (None for a layer pattern).
  paper, year, venue: the paper that introduced it.
  family: one of FAMILIES.
  op: the seqmix op(s) it uses, e.g. "linear_attention.gla".
  parents: names of the architectures it builds on: registered mixers or EXTERNAL_ANCESTORS
    keys, none younger than it (`lineage_errors()` checks).
  constant_state: decoding keeps a constant-size state (False: a growing KV cache).
  pattern: for a layer pattern, the mixer names repeated over the depth (for a pattern with a
    `layout`, one representative period: the members the shared tests stack).
  layout: for a pattern whose placement depends on the depth (Mamba-2-Hybrid spreads a share
    of attention layers evenly): n_layers -> one member name per layer; None: `pattern` is
    repeated.
  test_kwargs: small hyperparameters the shared tests use (at d_model=32).
  needs_positions: the mixer has no position information of its own (no decay, convolution
    or rotation: softmax attention without RoPE, the plain linear transformer), so a model
    using it needs pos_embedding="learned"; the shared learning test and the MQAR configs
    give it one.
  sequence_parallel: the mixer runs with its sequence sharded over the `sequence` mesh axis
    (context parallelism wired into the mixer); `seqmix.parallel.sharding` refuses a mesh that
    shards the sequence of a mixer without it. A pattern has it when all its members do.
  """
  name: str
  cls: Any
  paper: str
  year: int
  venue: str
  family: str
  op: str
  parents: tuple[str, ...] = ()
  constant_state: bool = True
  pattern: tuple[str, ...] = ()
  test_kwargs: dict = dataclasses.field(default_factory=dict)
  url: str = ""
  needs_positions: bool = False
  sequence_parallel: bool = False
  layout: Callable[[int], tuple[str, ...]] | None = None

  @property
  def is_pattern(self) -> bool:
    return bool(self.pattern)


_REGISTRY: dict[str, MixerInfo] = {}
_LOADED = False


def _check_meta(name, family, year):
  if family not in FAMILIES:
    raise ValueError(f"mixer {name!r}: family {family!r} is not one of {FAMILIES}.")
  if not (1990 <= int(year) <= 2100):
    raise ValueError(f"mixer {name!r}: year {year!r} looks wrong.")
  if name in _REGISTRY:
    raise ValueError(f"mixer {name!r} is registered twice "
                     f"({_REGISTRY[name].cls} and a new one).")


def register(name: str, *, paper: str, year: int, venue: str, family: str, op: str,
             parents=(), constant_state: bool = True, test_kwargs=None, url: str = "",
             needs_positions: bool = False, sequence_parallel: bool = False):
  """Class decorator adding a mixer to the registry."""
  def wrap(cls):
    _check_meta(name, family, year)
    _REGISTRY[name] = MixerInfo(name=name, cls=cls, paper=paper, year=int(year), venue=venue,
                                family=family, op=op, parents=tuple(parents),
                                constant_state=constant_state,
                                test_kwargs=dict(test_kwargs or {}), url=url,
                                needs_positions=needs_positions,
                                sequence_parallel=sequence_parallel)
    return cls
  return wrap


def register_pattern(name: str, pattern, *, paper: str, year: int, venue: str, op: str,
                     parents=(), url: str = "", layout=None):
  """A layer pattern (a hybrid): `pattern` names registered mixers, repeated over the depth.

  A member may be `"shared:<mixer>"`: every layer of that name in a model reuses one block
  (one set of parameters; Zamba's shared attention block), each application with its own cache.
  layout: None, or a function n_layers -> member names (a depth-dependent placement); then
    `pattern` is one representative period and every name the layout returns must be in it.
  Its decoding state is constant when every mixer of the pattern keeps a constant state (so
  the members must be registered first).
  """
  _check_meta(name, "hybrid", year)
  missing = [m for m in pattern if base_name(m) not in _REGISTRY]
  if missing:
    raise ValueError(f"register_pattern({name!r}): register {missing} before the pattern.")
  if layout is not None:
    for n in (1, 2, 7, 8, 28, 56):
      extra = sorted(set(layout(n)) - set(pattern))
      if extra:
        raise ValueError(f"register_pattern({name!r}): layout({n}) gives {extra}, which are "
                         f"not in the pattern {tuple(pattern)}; list every member there.")
  members = [_REGISTRY[base_name(m)] for m in pattern]
  _REGISTRY[name] = MixerInfo(name=name, cls=None, paper=paper, year=int(year), venue=venue,
                              family="hybrid", op=op, parents=tuple(parents),
                              constant_state=all(m.constant_state for m in members),
                              pattern=tuple(pattern), url=url,
                              sequence_parallel=all(m.sequence_parallel for m in members),
                              layout=layout)


def _load_all():
  global _LOADED
  if _LOADED:
    return
  import seqmix.mixers as pkg  # pylint: disable=g-import-not-at-top
  for mod in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
    importlib.import_module(mod.name)
  _LOADED = True


def names(*, include_patterns: bool = True) -> list[str]:
  """Every registered name, sorted."""
  _load_all()
  return sorted(n for n, i in _REGISTRY.items() if include_patterns or not i.is_pattern)


def get(name: str) -> MixerInfo:
  """The entry for `name`; an unknown name fails with the valid ones and the closest match.

  A shared layer name "shared:<mixer>" (see `register_pattern`) gives <mixer>'s entry.
  """
  _load_all()
  name = base_name(name)
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"Unknown mixer {name!r}.{hint} Registered mixers: {', '.join(names())}.")
  return _REGISTRY[name]


def lineage_errors() -> list[str]:
  """What is wrong with the registry's lineage (empty when every `parents` list is sound).

  Every entry of a registered mixer's (or external ancestor's) `parents` must name a
  registered mixer or an EXTERNAL_ANCESTORS entry, published the same year or earlier, and
  not itself; the names of the two sets must not overlap.
  """
  _load_all()
  errors = []
  for name in sorted(set(_REGISTRY) & set(EXTERNAL_ANCESTORS)):
    errors.append(f"{name!r} is both a registered mixer and an external ancestor: drop it "
                  f"from EXTERNAL_ANCESTORS.")
  nodes = {**{n: (i.year, i.parents) for n, i in _REGISTRY.items()},
           **{n: (a.year, a.parents) for n, a in EXTERNAL_ANCESTORS.items()}}
  for name, (year, parents) in sorted(nodes.items()):
    for p in parents:
      if p == name:
        errors.append(f"{name!r} lists itself as a parent.")
      elif p not in nodes:
        close = difflib.get_close_matches(p, list(nodes), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        errors.append(f"{name!r}: parent {p!r} is neither a registered mixer nor in "
                      f"registry.EXTERNAL_ANCESTORS{hint}; register it or add it there "
                      f"with its paper and year.")
      elif nodes[p][0] > year:
        errors.append(f"{name!r} ({year}) lists {p!r} ({nodes[p][0]}) as a parent, but the "
                      f"parent is younger: fix one of the years or the parents.")
  return errors


SHARED_PREFIX = "shared:"


def base_name(layer: str) -> str:
  """The registered mixer of one expanded layer name ("shared:mha" -> "mha", "gla" -> "gla")."""
  return layer[len(SHARED_PREFIX):] if layer.startswith(SHARED_PREFIX) else layer


def expand_pattern(spec: str, n_layers: int) -> list[str]:
  """A layer spec -> one mixer name per layer.

  `spec` is a mixer name, a registered pattern ("griffin"), or a comma-separated list
  ("mamba2,mamba2,mha") repeated over the depth. `n_layers` need not be a multiple. A pattern
  with a depth-dependent `layout` (mamba2_hybrid) is placed over the whole depth and must be
  the spec alone. An entry "shared:<mixer>" stays as it is: those layers share one block.
  """
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if not parts:
    raise ValueError(f"Empty mixer spec {spec!r}: give a name like 'mha' or 'gla,gla,mha'.")
  flat: list[str] = []
  for p in parts:
    info = get(base_name(p))
    if info.is_pattern and p != info.name:
      raise ValueError(f"{p!r}: only a mixer can be shared, and {info.name!r} is a layer "
                       f"pattern; share one of its members, e.g. 'shared:{info.pattern[0]}'.")
    if info.layout is not None:
      if len(parts) > 1:
        raise ValueError(f"mixer spec {spec!r}: {p!r} places its layers by the depth of the "
                         f"whole model; use it alone (mixer={p!r}).")
      return list(info.layout(n_layers))
    flat.extend(info.pattern if info.is_pattern else (p,))
  return [flat[i % len(flat)] for i in range(n_layers)]
