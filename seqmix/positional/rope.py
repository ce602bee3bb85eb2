"""Rotary position embedding (RoPE; Su et al. 2021, "RoFormer").

Convention: **rotate-half** (GPT-NeoX / Llama / Hugging Face layout), not interleaved pairs.
Of the R rotated channels of a head, channel `i < R/2` is paired with channel `i + R/2`:

    θ_i   = base ** (−2i / R),                i = 0 .. R/2 − 1
    x'_i       = x_i cos(p θ_i) − x_{i+R/2} sin(p θ_i)
    x'_{i+R/2} = x_{i+R/2} cos(p θ_i) + x_i sin(p θ_i)

for a token at position p. With `fraction < 1` (partial rotary, GPT-NeoX / Phi) only the first
R = 2·floor(fraction·D/2) channels rotate and the rest pass through unchanged. Because the
rotation is orthogonal and depends on p only through p·θ, ⟨rope(q, m), rope(k, n)⟩ depends on
the positions only through m − n. Weights from an interleaved-pair implementation (GPT-J,
Mesh-TF) need their q/k projection columns permuted to this layout.
"""

import jax.numpy as jnp

from seqmix.positional import rope_scaling as scaling
from seqmix.positional.base import rotate_half


def rotary_dim(head_dim: int, fraction: float = 1.0) -> int:
  """R: the number of rotated channels of a head (even; the rest pass through)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"RoPE fraction={fraction} must be in (0, 1] (the share of each head's "
                     "channels that rotate); use position='none' for no rotation.")
  r = 2 * int(fraction * head_dim // 2)
  if r == 0:
    raise ValueError(f"RoPE fraction={fraction} of head_dim={head_dim} rotates no channel pair; "
                     f"use fraction >= {2 / head_dim:.3g}.")
  return r


def inverse_frequencies(rot_dim: int, base: float = 10000.0):
  """θ [R/2] float32: base ** (−2i / R)."""
  if base <= 1.0:
    raise ValueError(f"RoPE base={base} must be > 1 (10000 in the paper).")
  return base ** (-jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim)


def apply_rope(x, positions, *, base: float = 10000.0, fraction: float = 1.0,
               rope_scaling=None):
  """Rotate the first R channels of every head by position.  x [B,T,H,D], positions [B,T].

  Computed in float32, returned in x's dtype. positions may be any integers (absolute,
  offset for decoding, restarted per document).
  rope_scaling: None (plain RoPE), or a Hugging Face style `rope_scaling` dict
    (`seqmix.positional.rope_scaling`): its inverse frequencies replace θ, and its attention
    factor multiplies the rotated channels (cos and sin, as HF), so q·k scales by its square.
    "dynamic" and "longrope" read the current length as max(positions) + 1 (HF's rule).
  """
  if x.ndim != 4 or positions.shape != x.shape[:2]:
    raise ValueError(f"apply_rope: x must be [B,T,H,D] and positions [B,T]; got {x.shape=}, "
                     f"{positions.shape=}.")
  d = x.shape[-1]
  r = rotary_dim(d, fraction)
  if rope_scaling is None:
    inv_freq, factor = inverse_frequencies(r, base), 1.0
  else:
    kind = scaling.rope_type(rope_scaling)
    seq_len = jnp.max(positions) + 1 if kind in scaling.SEQ_LEN_DEPENDENT else None
    inv_freq, factor = scaling.rope_parameters(rope_scaling, r, base, seq_len=seq_len)
  out = rotate_half(x, positions, inv_freq)                                       # float32
  if factor != 1.0:
    # HF scales cos and sin, so only the rotated channels carry the attention factor.
    out = jnp.concatenate([out[..., :r] * factor, out[..., r:]], axis=-1)
  return out.astype(x.dtype)
