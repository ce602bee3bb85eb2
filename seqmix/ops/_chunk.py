"""Helpers shared by the chunked forms of the recurrent ops (one copy, not one per op)."""

import jax.numpy as jnp

# Natural-log gates below this are treated as a hard reset: exp(g) underflows to ~1e-35 in
# float32 but differences of clamped values stay exact enough (see `clamp_log_gate`).
LOG_GATE_FLOOR = -80.0


def clamp_log_gate(g):
  """Replace -inf / very negative natural-log gates with LOG_GATE_FLOOR (no NaN from inf-inf)."""
  return jnp.maximum(g, jnp.asarray(LOG_GATE_FLOOR, g.dtype))


def pad_time(x, multiple: int, axis: int = 1, value=0):
  """Pad `x` along `axis` (time) up to a multiple of `multiple`; returns (padded, T)."""
  t = x.shape[axis]
  pad = (-t) % multiple
  if pad == 0:
    return x, t
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value), t


def to_chunks(x, chunk: int):
  """[B, T, ...] -> [B, T//chunk, chunk, ...] (T must be a multiple of chunk)."""
  b, t = x.shape[:2]
  return x.reshape(b, t // chunk, chunk, *x.shape[2:])


def from_chunks(x):
  """[B, N, C, ...] -> [B, N*C, ...]."""
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def segsum(g, axis: int = -1):
  """Exact pairwise sums of log gates along `axis`.

  g [..., C] -> [..., C, C] with out[..., t, s] = sum_{r=s+1}^{t} g[..., r] for s <= t and
  -inf above the diagonal. Summing g directly (not differencing a long cumsum) keeps the
  small near-diagonal decays exact when the cumsum itself is large.
  """
  g = jnp.moveaxis(g, axis, -1)
  c = g.shape[-1]
  r_idx = jnp.arange(c)[:, None]
  s_idx = jnp.arange(c)[None, :]
  x = jnp.broadcast_to(g[..., :, None], g.shape[:-1] + (c, c))   # [..., r, s] = g[r]
  x = jnp.where(r_idx > s_idx, x, 0.0)
  # A running sum that starts at zero for each s: no cancellation between large cumsums.
  out = jnp.cumsum(x, axis=-2)                                   # [..., t, s]
  return jnp.where(r_idx >= s_idx, out, -jnp.inf)
