"""One place where each op's `impl="auto"` is resolved, and logged once."""

import logging

import jax

_log = logging.getLogger("seqmix.ops")
_LOGGED: set = set()


def platform() -> str:
  return jax.default_backend()  # "cpu" | "gpu" | "tpu"


def resolve(op: str, impl: str, available: dict, auto: dict) -> str:
  """Return the impl to run.

  available: impl name -> True if implemented (False: exists in the contract, not yet built).
  auto: platform -> impl name chosen for `impl="auto"` ("default" for any other platform);
    an optional "why" entry maps a platform to the measurement behind its choice, which the
    log line quotes.
  Unknown or unbuilt impls raise, naming the ones that exist.
  """
  built = [k for k, ok in available.items() if ok]
  if impl == "auto":
    choice = auto.get(platform(), auto["default"])
    key = (op, platform(), choice)
    if key not in _LOGGED:
      _LOGGED.add(key)
      why = auto.get("why", {}).get(platform())
      _log.info("seqmix.ops.%s: impl='auto' -> %r on %s%s", op, choice, platform(),
                f" ({why})" if why else "")
    return choice
  if impl not in available:
    raise ValueError(f"{op}: unknown impl {impl!r}; choose one of {built + ['auto']}.")
  if not available[impl]:
    raise NotImplementedError(f"{op}: impl {impl!r} is not implemented yet; "
                              f"implemented: {built + ['auto']}.")
  return impl
