"""ALiBi: attention with linear biases (Press et al. 2022, "Train Short, Test Long").

Head h adds `−m_h · |pos_q − pos_k|` to its logits (no position embedding). For a causal
model only keys at or before the query are seen, where this is the paper's `−m_h (i − j)`;
the absolute value makes the same builder usable for non-causal attention (the symmetric
extension), and it keeps future keys (masked anyway) from getting a large positive bias.

Slopes (paper, section 3): for n heads a power of two, the geometric sequence that starts
at 2^(−8/n) with ratio 2^(−8/n) (8 heads: 1/2, 1/4, ..., 1/256). Otherwise, with p the
largest power of two below n, the p slopes of p heads followed by the first n − p of the
every-other slopes (indices 0, 2, 4, ...) of 2p heads.
"""

import math

import jax.numpy as jnp
import numpy as np


def _power_of_two_slopes(n: int) -> list[float]:
  start = 2.0 ** (-8.0 / n)
  return [start ** (i + 1) for i in range(n)]


def alibi_slopes(num_heads: int) -> np.ndarray:
  """m [H] float32: the per-head slopes of the paper, for any head count >= 1."""
  if num_heads < 1:
    raise ValueError(f"alibi_slopes: num_heads={num_heads} must be >= 1.")
  p = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = _power_of_two_slopes(p)
  if p < num_heads:
    slopes += _power_of_two_slopes(2 * p)[0::2][: num_heads - p]
  return np.asarray(slopes, np.float32)


def alibi_bias(slopes, q_positions, k_positions):
  """Additive logit bias −m_h |pos_q − pos_k|.

  slopes [H]; q_positions [B,T] (or [T]); k_positions [B,S] (or [S]).
  Returns float32 [B,H,T,S] (or [1,H,T,S] when both positions are 1-D).
  """
  q_pos = jnp.asarray(q_positions)
  k_pos = jnp.asarray(k_positions)
  q_pos = q_pos[None] if q_pos.ndim == 1 else q_pos
  k_pos = k_pos[None] if k_pos.ndim == 1 else k_pos
  dist = jnp.abs(q_pos[:, :, None] - k_pos[:, None, :]).astype(jnp.float32)  # [b, t, s]
  return -jnp.asarray(slopes, jnp.float32)[None, :, None, None] * dist[:, None]  # [b, h, t, s]
