"""Learned absolute position embeddings (GPT-2 style): a [max_len, D] table.

The model adds `LearnedPositionEmbedding(...)(positions)` to its token embeddings; mixers do
not use it.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.parallel import axes


class LearnedPositionEmbedding(nn.Module):
  """positions [B,T] int -> embeddings [B,T,D].

  max_len: number of positions in the table; positions must lie in [0, max_len).
  features: embedding width D.
  init_stddev: standard deviation of the normal init of the table.
  dtype: output dtype; param_dtype: table dtype.

  Out-of-range positions raise when the positions are concrete (eager calls, or
  `positions=None` with T > max_len at trace time). Under `jit` they cannot raise: the
  lookup then returns NaN rows (never a silently clamped row), so the loss shows it.
  """
  max_len: int
  features: int
  init_stddev: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, positions=None, *, length: int | None = None):
    """positions [B,T] int (None: arange(length) as [1,T], `length` required)."""
    table = self.param("embedding",
                       axes.param(nn.initializers.normal(self.init_stddev), axes.NONE,
                                  axes.EMBED),
                       (self.max_len, self.features), self.param_dtype)
    if positions is None:
      if length is None:
        raise ValueError("LearnedPositionEmbedding: pass positions [B,T] or length=T.")
      self._check_static_max(length - 1)
      positions = jnp.arange(length)[None]
    elif not isinstance(positions, jax.core.Tracer):
      self._check_static_max(int(jnp.max(positions)), int(jnp.min(positions)))
    # Gather in the table's dtype, then cast: the gradient is a scatter-add in param_dtype
    # (float32), not in a bfloat16 compute dtype (slow on GPUs: see seqmix/models/embed.py).
    out = jnp.take(table, positions, axis=0, mode="fill", fill_value=jnp.nan)
    return out.astype(self.dtype)

  def _check_static_max(self, hi: int, lo: int = 0):
    if hi >= self.max_len or lo < 0:
      raise ValueError(f"LearnedPositionEmbedding: positions must lie in "
                       f"[0, max_len={self.max_len}) but range over [{lo}, {hi}]; raise max_len "
                       "(the model's max_len) or use a relative encoding (rope, alibi).")
