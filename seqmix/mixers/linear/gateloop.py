"""GateLoop: fully data-controlled linear recurrence (Katsch, arXiv 2023).

GateLoop's recurrence, per head, with a complex data-controlled gate on every key channel:

    a_t = σ(x_t W_α + b_α) · exp(i (x_t W_θ + b_θ))        [K] complex, |a_t| < 1
    h_t = diag(a_t) h_{t−1} + k_tᵀ v_t                       [K, V] complex (q, k, v real)
    y_t = K^-1/2 · Re(q_t h_t)

computed here as a REAL `linear_attention.gla` with doubled key dim. With Θ_t = Σ_{u<=t} θ_u the
cumulative phase and r_t = σ(·) the magnitude,
    Re(q_t h_t) = Σ_{s<=t} (Π_{u=s+1}^{t} r_u) [ (q_t cos Θ_t)·(k_s cos Θ_s) + (q_t sin Θ_t)·(k_s sin Θ_s) ] v_s,
because Re(e^{i(Θ_t − Θ_s)}) = cos Θ_t cos Θ_s + sin Θ_t sin Θ_s. So q' = [q cos Θ, q sin Θ],
k' = [k cos Θ, k sin Θ] (`[B, T, H, 2K]`) and the per-key log gate g' = [log r, log r] give
exactly GateLoop's output; the gla state is h in the rotated frame ([Re, Im] of e^{−iΘ_t} h_t
stacked on the key axis). The decoding cache keeps the state and Θ of the last token (mod 2π).
Θ restarts at each document start (the state is reset there anyway; restarting keeps every
gradient path from one document to the next exactly zero). In float32 the cumulative phase loses
about T·|θ|·6e-8 radians over T tokens (≈2e-4 at T = 4096 with |θ| ≈ 1).

Around the recurrence: q, k, v, α, θ projections of x (biases on α, θ), an optional output gate
silu(x W_g) ⊙ y, and the output projection; Lecun-normal init, zero biases (as the reference
JAX implementation).
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.projections import sharded_dense
from seqmix.parallel import axes
from seqmix.parallel import dispatch


class GateLoopCache(NamedTuple):
  state: jax.Array  # [B, H, 2K, V] float32: [Re; Im] of the rotated complex state
  phase: jax.Array  # [B, H, K] float32 cumulative phase Θ of the last token, mod 2π
  seg: jax.Array    # [B] int32 segment id of the last token seen


def segmented_cumsum(theta, starts):
  """Θ_t = Σ θ_u over u <= t in t's document.  theta [B, T, ...], starts [B, T] bool or None.

  A `where`-based segmented scan, so no gradient at all (not a rounding residue of a difference
  of two cumsums) reaches an earlier document: the phase is relative, so restarting it at a
  document start changes no output.
  """
  if starts is None:
    return jnp.cumsum(theta, axis=1)
  reset = jnp.broadcast_to(starts.reshape(starts.shape + (1,) * (theta.ndim - 2)), theta.shape)

  def combine(left, right):
    r_l, v_l = left
    r_r, v_r = right
    return r_l | r_r, jnp.where(r_r, v_r, v_l + v_r)

  return jax.lax.associative_scan(combine, (reset, theta), axis=1)[1]


def rotate_by_phase(x, phase):
  """x [B, T, H, K] real, phase [B, T, H, K] -> [x cos Θ, x sin Θ] [B, T, H, 2K] (x's dtype)."""
  x32 = x.astype(jnp.float32)
  return jnp.concatenate([x32 * jnp.cos(phase), x32 * jnp.sin(phase)], axis=-1).astype(x.dtype)


@registry.register(
    "gateloop", paper="GateLoop: Fully Data-Controlled Linear Recurrence for Sequence Modeling",
    year=2023, venue="arXiv", family="linear-rnn", op="linear_attention.gla",
    parents=("retnet", "lru"), constant_state=True, test_kwargs={"num_heads": 2},
    sequence_parallel=True)
class GateLoop(MixerBase):
  """GateLoop token mixer.  x [B, T, D] -> y [B, T, D].

  num_heads: H; q, k, v have K = V = D/H channels per head; the gate is complex per key channel.
  use_output_gate: multiply the recurrence output by silu(x W_g) before the output projection.
  chunk_size, impl: passed to `linear_attention.gla`.
  """
  num_heads: int = 4
  use_output_gate: bool = True
  chunk_size: int = 64
  impl: str = "auto"

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> GateLoopCache:
    del max_len, dtype  # constant-size float32 state
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    h, hd = self.num_heads, self.d_model // self.num_heads
    return GateLoopCache(jnp.zeros((batch_size, h, 2 * hd, hd), jnp.float32),
                         jnp.zeros((batch_size, h, hd), jnp.float32),
                         jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], GateLoopCache | None)."""
    del positions, deterministic
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    b, t, d = x.shape
    h, hd = self.num_heads, d // self.num_heads
    dense = lambda use_bias, in_axis, out_axis, name: sharded_dense(
        d, in_axis, out_axis, name, use_bias=use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    q, k, v = (dense(False, axes.EMBED, axes.HEADS, n)(x).reshape(b, t, h, hd)  # [b, t, h, k]
               for n in ("q_proj", "k_proj", "v_proj"))
    alpha = dense(True, axes.EMBED, axes.HEADS, "magnitude_proj")(x).astype(jnp.float32)
    theta = dense(True, axes.EMBED, axes.HEADS, "phase_proj")(x).astype(jnp.float32)
    log_r = jax.nn.log_sigmoid(alpha).reshape(b, t, h, hd)               # log |a_t|
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    theta = theta.reshape(b, t, h, hd)                                   # [b, t, h, k]
    if cache is not None:
      carry = cache.phase if starts is None else jnp.where(starts[:, 0, None, None], 0.0,
                                                           cache.phase)
      theta = theta.at[:, 0].add(carry)
    phase = segmented_cumsum(theta, starts)                              # Θ_t  [b, t, h, k]
    q2, k2 = rotate_by_phase(q, phase), rotate_by_phase(k, phase)        # [b, t, h, 2k]
    g = jnp.concatenate([log_r, log_r], axis=-1)                         # [b, t, h, 2k]
    g = segments.reset_log_gate(g, starts)
    o, state = dispatch.gla(q2, k2, v, g, scale=hd ** -0.5,
                            initial_state=None if cache is None else cache.state,
                            chunk_size=self.chunk_size, impl=self.impl)
    o = o.reshape(b, t, d)                                               # [b, t, h·v]
    if self.use_output_gate:
      o = o * jax.nn.silu(dense(False, axes.EMBED, axes.HEADS, "g_proj")(x))
    y = dense(False, axes.HEADS, axes.EMBED, "o_proj")(o)
    new_cache = None
    if cache is not None:
      new_cache = GateLoopCache(state, jnp.mod(phase[:, -1], 2 * math.pi),
                                segments.last_segment_id(segment_ids, b))
    return y, new_cache
