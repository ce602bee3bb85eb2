"""RetNet multi-scale retention (Sun et al., "Retentive Network: A Successor to Transformer for
Large Language Models", arXiv 2023).

    γ_h = 1 − 2^(−5−h)                         fixed decay of head h (h = 0..H−1)
    q, k = rotate(x W_Q, n), rotate(x W_K, n)   xPos-style rotation by position n
    S_n = γ_h S_{n−1} + k_nᵀ v_n,  o_n = K^-1/2 · q_n S_n      (seqmix.ops.linear_attention.gla, g [H])
    y = W_O (swish(x W_G) ⊙ GroupNorm_head(o))

The rotation is the one of the official (torchscale) RetNet: consecutive channel pairs rotated by
n·θ_i with θ_i = 1 / 10000^(i / (K/2 − 1)), i = 0..K/2−1 (`linspace(0, 1, K/2)` exponents, not
RoPE's `arange(0, K, 2) / K`); the xPos length-extrapolation decay is the per-head γ itself.
GroupNorm is a per-head LayerNorm without affine parameters (as torchscale's retention). The
paper's extra normalisations of the retention scores (dividing the decay mask by the square
root of its row sums, and the scores by their clamped absolute row sums) multiply each head's
output at each position by one positive scalar, which the per-head GroupNorm removes up to its
eps, so they are left out.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.norms import LayerNorm
from seqmix.parallel import axes
from seqmix.parallel import dispatch

# torchscale's retention init: xavier_uniform with gain 2^-2.5 for W_Q, W_K, W_V, W_G and 2^-1
# for W_O (variance scales gain² over fan_avg).
_QKVG_INIT = nn.initializers.variance_scaling(2.0 ** -5, "fan_avg", "uniform")
_OUT_INIT = nn.initializers.variance_scaling(2.0 ** -2, "fan_avg", "uniform")


class RetNetCache(NamedTuple):
  state: jax.Array  # [B, H, K, V] float32
  seg: jax.Array    # [B] int32 segment id of the last token seen
  pos: jax.Array    # [B] int32 position the next token takes when positions are not given


def retention_log_decays(num_heads: int):
  """[H] float32 log γ_h with γ_h = 1 − 2^(−5−h) (the paper's multi-scale decays)."""
  return jnp.asarray(np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads)))), jnp.float32)


def rotate_pairs(x, positions, base: float = 10000.0):
  """Rotate consecutive channel pairs of x [B, T, H, K] by positions [B, T] · θ (torchscale).

  θ_i = base^(−i / (K/2 − 1)) for i = 0..K/2−1; pair (x_{2i}, x_{2i+1}) -> complex multiply by
  exp(i·n·θ_i). The rotation only changes q·k through position differences.
  """
  kd = x.shape[-1]
  half = kd // 2
  theta = 1.0 / base ** jnp.linspace(0.0, 1.0, half, dtype=jnp.float32)    # [k/2]
  ang = positions.astype(jnp.float32)[:, :, None, None] * theta            # [b, t, 1, k/2]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  xp = x.astype(jnp.float32).reshape(*x.shape[:-1], half, 2)               # [b, t, h, k/2, 2]
  x0, x1 = xp[..., 0], xp[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)                              # [b, t, h, k]


@registry.register(
    "retnet", paper="Retentive Network: A Successor to Transformer for Large Language Models",
    year=2023, venue="arXiv", family="linear-attention", op="linear_attention.gla",
    parents=("linear_transformer",), constant_state=True,
    test_kwargs={"num_heads": 2}, sequence_parallel=True)
class RetNet(MixerBase):
  """Multi-scale retention.  x [B, T, D] -> y [B, T, D].

  num_heads: H; the key width D is split into H heads of K = D/H (K even, for the rotation).
  value_factor: value width over D (the paper: 2, so V = 2D/H per head).
  rope_base: base of the rotation frequencies (10000).
  norm_eps: eps of the per-head GroupNorm.
  chunk_size, impl: passed to `linear_attention.gla`.
  """
  num_heads: int = 4
  value_factor: int = 2
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  chunk_size: int = 64
  impl: str = "auto"

  def _check(self):
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    kd = self.d_model // self.num_heads
    if kd % 2 or kd < 4:
      raise ValueError(f"retnet: the head key dim d_model/num_heads = {kd} must be even and >= 4 "
                       f"for the pairwise rotation; change num_heads or d_model.")
    if self.value_factor < 1:
      raise ValueError(f"retnet: value_factor={self.value_factor} must be a positive int "
                       f"(the paper uses 2).")
    return kd, kd * self.value_factor

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> RetNetCache:
    del max_len, dtype  # constant-size float32 state
    kd, vd = self._check()
    return RetNetCache(jnp.zeros((batch_size, self.num_heads, kd, vd), jnp.float32),
                       jnp.full((batch_size,), -1, jnp.int32), jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], RetNetCache | None).  positions default to the token count."""
    del deterministic
    kd, vd = self._check()
    b, t, d = x.shape
    h = self.num_heads
    dense = lambda f, init, in_axis, out_axis, name: nn.Dense(
        f, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=axes.param(init, in_axis, out_axis))
    x = x.astype(self.dtype)
    q = dense(d, _QKVG_INIT, axes.EMBED, axes.HEADS, "q_proj")(x).reshape(b, t, h, kd)
    k = dense(d, _QKVG_INIT, axes.EMBED, axes.HEADS, "k_proj")(x).reshape(b, t, h, kd)
    v = dense(h * vd, _QKVG_INIT, axes.EMBED, axes.HEADS, "v_proj")(x).reshape(b, t, h, vd)
    if positions is None:
      start = jnp.zeros((b,), jnp.int32) if cache is None else cache.pos
      positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [b, t]
    q = rotate_pairs(q, positions, self.rope_base)
    k = rotate_pairs(k, positions, self.rope_base)

    log_gamma = retention_log_decays(h)                                  # [h]
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    g = (log_gamma if starts is None else
         segments.reset_log_gate(jnp.broadcast_to(log_gamma, (b, t, h)), starts))
    o, state = dispatch.gla(q, k, v, g,
                            initial_state=None if cache is None else cache.state,
                            chunk_size=self.chunk_size, impl=self.impl)
    o = LayerNorm(eps=self.norm_eps, use_bias=False, use_scale=False, dtype=self.dtype,
                  name="group_norm")(o)                                  # [b, t, h, v]
    gate = dense(h * vd, _QKVG_INIT, axes.EMBED, axes.HEADS, "g_proj")(x)
    o = jax.nn.silu(gate) * o.reshape(b, t, h * vd)                      # [b, t, h·v]
    y = dense(d, _OUT_INIT, axes.HEADS, axes.EMBED, "o_proj")(o)
    new_cache = None
    if cache is not None:
      new_cache = RetNetCache(state, segments.last_segment_id(segment_ids, b),
                              positions[:, -1].astype(jnp.int32) + 1)
    return y, new_cache
