"""The mixer protocol (DESIGN.md, "Mixer protocol") as a base class.

Every registered mixer subclasses `MixerBase` and implements

    __call__(x [B,T,D], *, segment_ids=None, positions=None, cache=None, deterministic=True)
        -> (y [B,T,D], new_cache)      # cache=None: parallel forward, returns (y, None)
    init_cache(batch_size, max_len, dtype=jnp.float32) -> cache (NamedTuple / struct)

`positions` [B,T] int are absolute token positions (prefill/decoding pass the offset);
`segment_ids` [B,T] int mark packed documents: state never crosses a boundary.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class MixerBase(nn.Module):
  """Fields every mixer has.

  d_model: model width D (input and output).
  layer_idx: position of this block in the stack (some inits and decays depend on depth).
  n_layers: depth of the stack.
  dtype: compute dtype; param_dtype: parameter dtype.
  """
  d_model: int
  layer_idx: int = 0
  n_layers: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    raise NotImplementedError(f"{type(self).__name__} does not implement init_cache.")


def segment_starts(segment_ids, *, cache_last_id=None):
  """[B,T] bool: True where a token starts a new document.

  The first token starts one unless `cache_last_id` [B] (the previous chunk's last id)
  equals its id. `segment_ids=None` -> None (one document, no resets).
  """
  if segment_ids is None:
    return None
  prev = jnp.concatenate([segment_ids[:, :1] if cache_last_id is None
                          else cache_last_id[:, None].astype(segment_ids.dtype),
                          segment_ids[:, :-1]], axis=1)
  starts = segment_ids != prev
  if cache_last_id is None:
    starts = starts.at[:, 0].set(True)
  return starts


def check_divisible(name: str, value: int, by: int, by_name: str):
  """Raise a config error naming the fields when `value % by != 0`."""
  if by <= 0 or value % by:
    raise ValueError(f"{name}={value} must be divisible by {by_name}={by}; "
                     f"change one of them (e.g. {by_name}={_a_divisor(value, by)}).")


def _a_divisor(value: int, near: int) -> int:
  divs = [d for d in range(1, value + 1) if value % d == 0]
  return min(divs, key=lambda d: abs(d - near))
