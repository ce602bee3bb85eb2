"""Helpers shared by the config files: the `get_config(arg)` argument string."""

from typing import Any


def parse_arg(arg: str | None, defaults: dict[str, Any], flags: tuple[str, ...] = ("smoke",)):
  """'mixer=gla,T=256,smoke' -> ({'mixer': 'gla', 'T': 256, ...defaults}, {'smoke'}).

  Values take the type of their default; unknown keys or flags fail naming the valid ones.
  """
  out, on = dict(defaults), set()
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" not in part:
      if part not in flags:
        raise ValueError(f"Unknown config flag {part!r}; flags: {list(flags)}, keys: "
                         f"{sorted(defaults)} (as key=value).")
      on.add(part)
      continue
    key, value = (s.strip() for s in part.split("=", 1))
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; valid: {sorted(defaults)}.")
    default = defaults[key]
    out[key] = type(default)(value) if default is not None else value
  return out, on
