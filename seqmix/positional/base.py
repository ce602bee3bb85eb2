"""The positional-component registry: name -> component (a Linen module) + its paper.

A component is how an attention mixer (`mha`, field `position`) encodes where its tokens
are. It does one or both of:

    rotate(q, k, positions) -> (q', k')        q [B,T,H,Dh], k [B,T,G,Dh], positions [B,T]
        a per-token transform of queries and keys (RoPE-like rotations, xPos scaling, a
        per-head temperature). Keys are cached after it, so decoding never redoes it.
    bias(q, k, q_pos, k_pos, *, k_idx, visible) -> [B|1, H, Tq, Tk] float32
        an additive logit bias from query and key positions (and, for `CONTENT`
        components such as CoPE and CAPE, from q/k themselves). Decoding calls it with the
        T new queries against [cache slots, new tokens] only: the bias of the cached
        positions, never the whole prefix's [S, S] matrix.

Positions the bias sees are `bias_positions(positions, cache)`: the token positions for
every component but BiPE (which biases by sentence index). The cache stores them per slot,
so decoding passes each slot's own position.

Every component's class docstring holds the equation it implements; `describe(name)` returns
it. `names()` is complete whatever was imported (the component modules load on lookup).

    @register("kerple_log", paper="KERPLE: Kernelized Relative Positional Embedding for "
              "Length Extrapolation", year=2022, venue="NeurIPS", parents=("alibi",))
    class KerpleLog(PositionalComponent): ...
"""

import dataclasses
import difflib
import importlib
import pkgutil
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

# Mask value for invisible (query, key) pairs: finite, so exp(mask − max) is exactly 0 and
# no NaN appears where a bias is −inf-free by construction.
MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class PositionalInfo:
  """What the registry knows of one positional component.

  name: the value of `mha(position=...)`.
  cls: the component (a PositionalComponent subclass).
  paper, year, venue, url: the paper that introduced it.
  parents: registered component names it builds on (none younger than it).
  builtin: `mha` applies it through its own inline code (rope, alibi, none), exactly as
    before the registry; `cls` then is the same maths as a component for other mixers.
  """
  name: str
  cls: Any
  paper: str
  year: int
  venue: str
  url: str = ""
  parents: tuple[str, ...] = ()
  builtin: bool = False

  @property
  def kind(self) -> str:
    """"rotate", "bias", "rotate+bias" or "none"."""
    parts = [p for p, on in (("rotate", self.cls.ROTATES), ("bias", self.cls.BIAS)) if on]
    return "+".join(parts) or "none"

  @property
  def equation(self) -> str:
    return self.cls.__doc__ or ""


_REGISTRY: dict[str, PositionalInfo] = {}
_LOADED = False

# Build-table rows (CATALOG.md section 6, positional encodings) that are not built yet:
# asking for one raises NotImplementedError naming what exists.
NOT_BUILT = {
    "3d_rpe": "3D-RPE (Ma+ 2024): rotary encoding on a Bloch sphere",
    "trf": "the TRF extrapolation conditions and their derived RPEs (Qin+ AAAI'24)",
    "attention_alignment": "attention alignment / T5-bias temperature (Chi+ 2023)",
}


class PositionalComponent(nn.Module):
  """Base: no rotation, no bias (subclasses override `rotate` and/or `bias`).

  num_heads: query heads H; head_dim: Dh (keys may have fewer heads G, H % G == 0).
  rope_base, rope_fraction: the rotation frequencies of rotary components (the attention
    mixer's `rope_base` / `rope_fraction`), θ_i = base^(−2i/R) on R rotated channels.
  Class flags: ROTATES (rotate is not the identity), BIAS (bias is defined), CONTENT (bias
  reads q/k and the mask `visible` [B,Tq,Tk] bool of the pairs that attend).
  Keys may come in any slot order (a ring-buffer cache): `k_idx` [B,Tk] gives each key's
  token index (None: keys are tokens 0..Tk−1 in order, the parallel form).
  """
  num_heads: int
  head_dim: int
  rope_base: float = 10000.0
  rope_fraction: float = 1.0

  ROTATES: ClassVar[bool] = False
  BIAS: ClassVar[bool] = False
  CONTENT: ClassVar[bool] = False

  def rotate(self, q, k, positions):
    """(q [B,T,H,Dh], k [B,T,G,Dh]) at positions [B,T] -> (q', k') of the same shapes."""
    del positions
    return q, k

  def bias_positions(self, positions, cache=None):
    """Positions [B,T] the bias and the cache use for these tokens (default: positions)."""
    del cache
    return positions

  def bias(self, q, k, q_pos, k_pos, *, k_idx=None, visible=None):
    """Additive logit bias [B|1, H, Tq, Tk] (float32)."""
    raise NotImplementedError(f"{type(self).__name__} adds no bias (BIAS is False).")


def register(name: str, *, paper: str, year: int, venue: str, url: str = "", parents=(),
             builtin: bool = False):
  """Class decorator adding a positional component to the registry."""
  def wrap(cls):
    if name in _REGISTRY:
      raise ValueError(f"positional component {name!r} is registered twice.")
    if not (isinstance(cls, type) and issubclass(cls, PositionalComponent)):
      raise TypeError(f"positional component {name!r} must subclass PositionalComponent.")
    _REGISTRY[name] = PositionalInfo(name=name, cls=cls, paper=paper, year=int(year),
                                     venue=venue, url=url, parents=tuple(parents),
                                     builtin=builtin)
    return cls
  return wrap


def _load_all():
  global _LOADED
  if _LOADED:
    return
  import seqmix.positional as pkg  # pylint: disable=g-import-not-at-top
  for mod in pkgutil.iter_modules(pkg.__path__, prefix=pkg.__name__ + "."):
    importlib.import_module(mod.name)
  _LOADED = True


def names() -> list[str]:
  """Every registered component name, sorted."""
  _load_all()
  return sorted(_REGISTRY)


def get(name: str) -> PositionalInfo:
  """The entry for `name`; an unknown name fails listing the registered ones."""
  _load_all()
  if name in NOT_BUILT:
    raise NotImplementedError(f"position={name!r} ({NOT_BUILT[name]}) is not built yet; "
                              f"registered components: {', '.join(names())}.")
  if name not in _REGISTRY:
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"position={name!r} is not a registered positional component.{hint} "
                     f"Registered: {', '.join(names())}. Learned absolute positions belong "
                     f"to the model (pos_embedding='learned').")
  return _REGISTRY[name]


def describe(name: str) -> str:
  """The equation (class docstring) of component `name`."""
  return get(name).equation


def build(name: str, *, num_heads: int, head_dim: int, rope_base: float = 10000.0,
          rope_fraction: float = 1.0, kwargs=None, module_name: str | None = "positional"):
  """Component `name` for H heads of Dh channels, with its own options `kwargs` (a dict)."""
  info = get(name)
  kwargs = dict(kwargs or {})
  own = {f.name for f in dataclasses.fields(info.cls)} - {
      "num_heads", "head_dim", "rope_base", "rope_fraction", "parent", "name"}
  unknown = sorted(set(kwargs) - own)
  if unknown:
    raise ValueError(f"position_kwargs {unknown} are not options of position={name!r}; its "
                     f"options are {sorted(own) or 'none'}.")
  return info.cls(num_heads=num_heads, head_dim=head_dim, rope_base=rope_base,
                  rope_fraction=rope_fraction, name=module_name, **kwargs)


def relative_distance(q_pos, k_pos):
  """q_pos [B,T], k_pos [B,S] int -> float32 [B,1,T,S] of q_pos − k_pos (≥ 0 where causal)."""
  d = q_pos.astype(jnp.int32)[:, :, None] - k_pos.astype(jnp.int32)[:, None, :]
  return d.astype(jnp.float32)[:, None]


def repeat_kv(k, num_heads: int):
  """k [B,S,G,Dh] -> [B,S,H,Dh]: query head i reads kv head i // (H/G)."""
  return jnp.repeat(k, num_heads // k.shape[2], axis=2)


def scaled_logits(q, k, num_heads: int):
  """Dh^−½ q·k per query head: q [B,T,H,Dh], k [B,S,G,Dh] -> float32 [B,H,T,S]."""
  kr = repeat_kv(k, num_heads).astype(jnp.float32)
  return jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kr) * q.shape[-1] ** -0.5


def rotate_half(x, positions, inv_freq):
  """Rotate-half rotation (seqmix.positional.rope's layout) by given frequencies.

  x [B,T,H,D]; positions [B,T]; inv_freq [R/2] (R ≤ D rotated channels, the rest pass):
  x'_i = x_i cos(p θ_i) − x_{i+R/2} sin(p θ_i), x'_{i+R/2} = x_{i+R/2} cos + x_i sin.
  Returns float32 (callers cast).
  """
  r = 2 * inv_freq.shape[0]
  ang = positions.astype(jnp.float32)[..., None] * inv_freq[None, None]   # [b, t, r/2]
  cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]           # [b, t, 1, r/2]
  x = x.astype(jnp.float32)
  x1, x2, rest = x[..., : r // 2], x[..., r // 2: r], x[..., r:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
