"""Token shift: x_{t-1} (zeros at a sequence or document start), with a decoding cache (RWKV)."""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class TokenShiftCache(NamedTuple):
  last: jax.Array  # [B, D] the previous token's input
  seg: jax.Array   # [B] int32 its segment id (-1 before the first token)


def init_token_shift_cache(batch_size: int, features: int, dtype=jnp.float32) -> TokenShiftCache:
  return TokenShiftCache(jnp.zeros((batch_size, features), dtype),
                         jnp.full((batch_size,), -1, jnp.int32))


def token_shift(x, *, segment_ids=None, cache: Optional[TokenShiftCache] = None):
  """x [B,T,D] -> (x_prev [B,T,D], new cache or None); x_prev is 0 across document starts."""
  b, t, d = x.shape
  prev_tok = jnp.zeros((b, 1, d), x.dtype) if cache is None else cache.last[:, None].astype(x.dtype)
  shifted = jnp.concatenate([prev_tok, x[:, :-1]], axis=1)          # [b, t, d]
  if segment_ids is not None:
    seg = segment_ids.astype(jnp.int32)
    prev_seg = (jnp.full((b, 1), -1, jnp.int32) if cache is None else cache.seg[:, None])
    prev_seg = jnp.concatenate([prev_seg, seg[:, :-1]], axis=1)
    shifted = jnp.where((prev_seg == seg)[..., None], shifted, 0)
  new_cache = None
  if cache is not None:
    last_seg = (segment_ids[:, -1].astype(jnp.int32) if segment_ids is not None
                else jnp.zeros((b,), jnp.int32))
    new_cache = TokenShiftCache(x[:, -1].astype(cache.last.dtype), last_seg)
  return shifted, new_cache
