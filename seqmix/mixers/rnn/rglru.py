"""RG-LRU: the Real-Gated Linear Recurrent Unit of Griffin / Hawk (De et al., "Griffin: Mixing
Gated Linear Recurrences with Local Attention for Efficient Language Models", arXiv 2024), with
the gates and initialisation of the reference code (recurrentgemma).

Per channel (width W, split into H blocks for the gate projections):

    r_t = σ(BlockDiag_a(x_t)),  i_t = σ(BlockDiag_x(x_t))        recurrence and input gates
    log a_t = −c · r_t · softplus(Λ)       (a = σ(−Λ) = exp(−softplus(Λ)), a_t = a^(c r_t), c = 8)
    h_t = a_t ⊙ h_{t−1} + √(1 − a_t²) ⊙ (i_t ⊙ x_t)                 (seqmix.ops.scan.linear_scan)

`BlockDiag` is a block-diagonal linear map with bias (H blocks of W/H channels), so each head's
gates see only its own channels. At a document start the state is reset (a_t = 0) and the
input normaliser is 1 there (√(1 − 0²) = 1), as recurrentgemma does. The derivative of the
square root is bounded by 1000 (recurrentgemma clips it so bf16 training does not give NaNs
where a_t → 1).

Initialisation: Λ so that a = exp(−softplus(Λ)) is uniform on the ring min_rad ≤ |a| ≤ max_rad by
area (a² uniform in [0.9², 0.999²]); gate weights N(0, 1/W), biases 0. Note: the paper's text
says Λ is set so that a^c lies in [0.9, 0.999]; the reference code (followed here) puts a itself
(the value of a_t when r_t = 1/c) in that ring.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.mixers.base import check_divisible
from seqmix.parallel import axes
from seqmix.parallel import dispatch

# recurrentgemma bounds d√x/dx by this; the input normaliser √(1 − a²) is the only user.
MAX_SQRT_GRADIENT = 1000.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bounded_grad(x, max_gradient: float):
  """√x whose derivative 1/(2√x) is capped at `max_gradient` (x floored at 1/(4 max²))."""
  del max_gradient
  return jnp.sqrt(x)


def _sqrt_fwd(x, max_gradient):
  del max_gradient
  return jnp.sqrt(x), x


def _sqrt_bwd(max_gradient, x, g):
  floor = 1.0 / (4.0 * max_gradient ** 2)
  return (g * 0.5 * jax.lax.rsqrt(jnp.maximum(x, floor)),)


sqrt_bounded_grad.defvjp(_sqrt_fwd, _sqrt_bwd)


def ring_softplus_init(min_rad: float, max_rad: float, eps: float = 1e-8):
  """Λ with exp(−softplus(Λ)) = r, r² ~ U(min_rad², max_rad²) (uniform by area on the ring)."""
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    log_r = 0.5 * jnp.log(u * (max_rad ** 2 - min_rad ** 2) + min_rad ** 2 + eps)   # < 0
    return jnp.log(jnp.expm1(-log_r)).astype(dtype)          # softplus⁻¹(−log r)
  return init


def check_radii(min_rad: float, max_rad: float):
  if not 0.0 < min_rad <= max_rad < 1.0:
    raise ValueError(f"RG-LRU: need 0 < min_rad <= max_rad < 1 for the init ring of a; got "
                     f"min_rad={min_rad}, max_rad={max_rad} (Griffin uses 0.9, 0.999).")


class BlockDiagonalLinear(nn.Module):
  """y = x W + b with W block-diagonal (H blocks).  x [..., W] -> y [..., W].

  num_blocks: H; the width must be a multiple of it.
  w_init_variance_scale: weights ~ N(0, scale / W). As recurrentgemma: variance scaling of the
    [H, W/H, W/H] array counts the block axis into the fan-in (W/H · H = W), not only W/H.
  """
  num_blocks: int
  w_init_variance_scale: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    w_total = x.shape[-1]
    check_divisible("lru_width", w_total, self.num_blocks, "num_heads")
    bw = w_total // self.num_blocks
    w = self.param("w", axes.param(
        nn.initializers.variance_scaling(self.w_init_variance_scale, "fan_in", "normal"),
        # One logical name may appear once per array (flax refuses ("kv", "kv") when it maps
        # the names to a mesh): the output dim is named NONE (replicated, as KV is).
        axes.HEADS, axes.KV, axes.NONE), (self.num_blocks, bw, bw), self.param_dtype)
    b = self.param("b", axes.param(nn.initializers.zeros, axes.HEADS, axes.KV),
                   (self.num_blocks, bw), self.param_dtype)
    xb = x.astype(self.dtype).reshape(*x.shape[:-1], self.num_blocks, bw)    # [..., h, i]
    y = jnp.einsum("...hi,hij->...hj", xb, w.astype(self.dtype)) + b.astype(self.dtype)
    return y.reshape(x.shape)                                                 # [..., w]


class RGLRU(nn.Module):
  """The RG-LRU recurrence (module docstring).  x [B, T, W] -> (y [B, T, W], h_T [B, W] f32).

  num_heads: H, blocks of the block-diagonal gate projections.
  c: the gate exponent constant (8).
  min_rad, max_rad: init ring of a = exp(−softplus(Λ)) (0.9, 0.999).
  impl, chunk_size: passed to `seqmix.ops.scan.linear_scan`.
  """
  num_heads: int
  c: float = 8.0
  min_rad: float = 0.9
  max_rad: float = 0.999
  impl: str = "auto"
  chunk_size: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, starts=None, h0=None):
    """x [B, T, W]; starts [B, T] bool document starts or None; h0 [B, W] float32 or None."""
    check_radii(self.min_rad, self.max_rad)
    width = x.shape[-1]
    a_param = self.param("a_param", axes.param(ring_softplus_init(self.min_rad, self.max_rad),
                                               axes.HEADS), (width,), self.param_dtype)
    gate = lambda name: BlockDiagonalLinear(self.num_heads, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    x = x.astype(self.dtype)
    gate_x = jax.nn.sigmoid(gate("input_gate")(x).astype(jnp.float32))      # i_t  [b, t, w]
    gate_a = jax.nn.sigmoid(gate("a_gate")(x).astype(jnp.float32))          # r_t
    log_a = -self.c * gate_a * jax.nn.softplus(a_param.astype(jnp.float32))
    a = jnp.exp(log_a)
    norm = sqrt_bounded_grad(1.0 - jnp.exp(2.0 * log_a), MAX_SQRT_GRADIENT)
    if starts is not None:
      s = starts[..., None]
      a = jnp.where(s, 0.0, a)            # hard reset: nothing of the previous document
      norm = jnp.where(s, 1.0, norm)      # and the first input enters unscaled
    u = (x.astype(jnp.float32) * gate_x * norm).astype(self.dtype)
    return dispatch.linear_scan(a, u, initial_state=h0, chunk_size=self.chunk_size,
                                impl=self.impl)
