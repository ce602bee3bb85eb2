"""Mamba2: the SSD layer (Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient
Algorithms Through Structured State Space Duality", ICML 2024), through `linear_attention.gla`.

    [z, x, B, C, dt] = u W_in                          x: H heads of P, B/C: G groups of N
    [x, B, C] = silu(ShortConv([x, B, C]))              depthwise causal conv, 4 taps
    Δ = softplus(dt + dt_bias)  [B, T, H];  A = −exp(A_log)  [H]
    h_t = exp(A Δ_t) h_{t−1} + B_tᵀ (Δ_t x_t),  y_t = C_t h_t      (gla: q = C, k = B, v = x·Δ,
                                                                    g = A·Δ, scale 1, G groups)
    y = W_out RMSNormGated(y + D ⊙ x, z)               norm(y ⊙ silu(z)) per group, as mamba_ssm

Initialisation as mamba_ssm's `Mamba2`: Δ = softplus(dt_bias) ~ LogUniform(dt_min, dt_max)
(floored at dt_init_floor), A ~ U(A_init_range), D = 1, projections PyTorch-default uniform.
The state is `[B, H, N, P]` (the contract's `[K, V]` with K = N, V = P).
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.norms import GatedRMSNorm
from seqmix.mixers.common.short_conv import ShortConv, ShortConvCache
from seqmix.parallel import axes
from seqmix.parallel import dispatch

# PyTorch's nn.Linear default (kaiming_uniform(a=√5)): U(−1/√fan_in, 1/√fan_in).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Mamba2Cache(NamedTuple):
  conv: ShortConvCache  # the short conv's last L−1 inputs over [x, B, C]
  state: jax.Array      # [B, H, N, P] float32 SSM state
  seg: jax.Array        # [B] int32 segment id of the last token seen


def dt_bias_init(dt_min: float, dt_max: float, dt_init_floor: float):
  """dt_bias with softplus(dt_bias) ~ LogUniform(dt_min, dt_max), floored at dt_init_floor."""
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, dt_init_floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)   # softplus⁻¹(dt)
  return init


def a_log_init(low: float, high: float):
  """A_log = log(A), A ~ U(low, high) (so A = −exp(A_log) ∈ [−high, −low])."""
  def init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)
  return init


@registry.register(
    "mamba2", paper="Transformers are SSMs: Generalized Models and Efficient Algorithms Through "
    "Structured State Space Duality", year=2024, venue="ICML", family="ssm",
    op="linear_attention.gla + conv.causal_conv", parents=("mamba", "linear_transformer"),
    constant_state=True,
    test_kwargs={"d_state": 16, "headdim": 16, "expand": 2}, sequence_parallel=True)
class Mamba2(MixerBase):
  """Mamba2 (SSD) layer.  x [B, T, D] -> y [B, T, D].

  d_state: N, the SSM state size per head (128).
  d_conv: taps L of the short causal conv (4).
  expand: inner width E·D = d_inner (2).
  headdim: P, channels per head; H = d_inner / P heads (64).
  ngroups: G groups of B/C shared by H/G heads each (1); also the groups of the gated norm.
  dt_min, dt_max, dt_init_floor: Δ at init ~ LogUniform(dt_min, dt_max), >= dt_init_floor.
  A_init_range: A ~ U(low, high) at init (1, 16).
  norm_eps: eps of the gated RMSNorm.
  norm_groups: groups of the gated RMSNorm (None: ngroups, as mamba_ssm; 1: normalise the whole
    inner width at once, as transformers' `Mamba2` does whatever its n_groups). Must divide
    nheads.
  conv_bias: bias in the short conv. bias: biases on W_in / W_out (False, as mamba_ssm's
    default; transformers' `use_bias`).
  chunk_size, impl: passed to `linear_attention.gla`; conv_impl to `conv.causal_conv`.
  """
  d_state: int = 128
  d_conv: int = 4
  expand: int = 2
  headdim: int = 64
  ngroups: int = 1
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  dt_init_floor: float = 1e-4
  A_init_range: tuple = (1.0, 16.0)
  norm_eps: float = 1e-5
  norm_groups: int | None = None
  conv_bias: bool = True
  bias: bool = False
  chunk_size: int = 64
  impl: str = "auto"
  conv_impl: str = "auto"

  def _dims(self):
    d_inner = self.expand * self.d_model
    check_divisible("d_inner (expand·d_model)", d_inner, self.headdim, "headdim")
    nheads = d_inner // self.headdim
    check_divisible("nheads (expand·d_model/headdim)", nheads, self.ngroups, "ngroups")
    if self.norm_groups is not None:
      check_divisible("nheads (expand·d_model/headdim)", nheads, self.norm_groups, "norm_groups")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"mamba2: need 0 < dt_min <= dt_max; got dt_min={self.dt_min}, "
                       f"dt_max={self.dt_max} (defaults 1e-3, 1e-1).")
    if not 0 < self.A_init_range[0] <= self.A_init_range[1]:
      raise ValueError(f"mamba2: A_init_range={self.A_init_range} must be (low, high) with "
                       f"0 < low <= high (default (1, 16)).")
    return d_inner, nheads, d_inner + 2 * self.ngroups * self.d_state

  def _conv(self, conv_dim):
    return ShortConv(conv_dim, self.d_conv, use_bias=self.conv_bias, activation="silu",
                     impl=self.conv_impl, axis=axes.HEADS, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="conv1d")

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> Mamba2Cache:
    del max_len
    _, nheads, conv_dim = self._dims()
    l1 = self.d_conv - 1
    conv = ShortConvCache(jnp.zeros((batch_size, l1, conv_dim), dtype),
                          jnp.full((batch_size, l1), -1, jnp.int32))
    return Mamba2Cache(conv, jnp.zeros((batch_size, nheads, self.d_state, self.headdim),
                                       jnp.float32), jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], Mamba2Cache | None)."""
    del positions, deterministic
    d_inner, nheads, conv_dim = self._dims()
    b, t, _ = x.shape
    gn = self.ngroups * self.d_state
    x = x.astype(self.dtype)
    zxbcdt = nn.Dense(2 * d_inner + 2 * gn + nheads, use_bias=self.bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="in_proj",
                      kernel_init=axes.param(TORCH_LINEAR_INIT, axes.EMBED, axes.HEADS),
                      bias_init=axes.param(nn.initializers.zeros, axes.HEADS))(x)
    z, xbc, dt = jnp.split(zxbcdt, [d_inner, d_inner + conv_dim], axis=-1)
    xbc, conv_cache = self._conv(conv_dim)(xbc, segment_ids=segment_ids,
                                           cache=None if cache is None else cache.conv)
    xs, bm, cm = jnp.split(xbc, [d_inner, d_inner + gn], axis=-1)
    xs = xs.reshape(b, t, nheads, self.headdim)                          # [b, t, h, p]
    bm = bm.reshape(b, t, self.ngroups, self.d_state)                    # [b, t, g, n]
    cm = cm.reshape(b, t, self.ngroups, self.d_state)

    dt_bias = self.param("dt_bias", axes.param(
        dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor), axes.HEADS), (nheads,),
        self.param_dtype)
    a_log = self.param("A_log", axes.param(a_log_init(*self.A_init_range), axes.HEADS), (nheads,),
                       self.param_dtype)
    d_skip = self.param("D", axes.param(nn.initializers.ones, axes.HEADS), (nheads,),
                        self.param_dtype)
    delta = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))  # [b, t, h]
    log_decay = -jnp.exp(a_log.astype(jnp.float32)) * delta             # A·Δ  [b, t, h]
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    log_decay = segments.reset_log_gate(log_decay, starts)
    v = (xs.astype(jnp.float32) * delta[..., None]).astype(self.dtype)   # [b, t, h, p]
    y, state = dispatch.gla(cm, bm, v, log_decay, scale=1.0,
                            initial_state=None if cache is None else cache.state,
                            chunk_size=self.chunk_size, impl=self.impl)
    y = y + d_skip.astype(self.dtype)[:, None] * xs                      # [b, t, h, p]
    y = GatedRMSNorm(eps=self.norm_eps, group_size=d_inner // (self.norm_groups or self.ngroups),
                     norm_before_gate=False, axis_name=axes.HEADS, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="norm")(y.reshape(b, t, d_inner), z)
    out = nn.Dense(self.d_model, use_bias=self.bias, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="out_proj",
                   kernel_init=axes.param(TORCH_LINEAR_INIT, axes.HEADS, axes.EMBED),
                   bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(y)
    new_cache = None if cache is None else Mamba2Cache(
        conv_cache, state, segments.last_segment_id(segment_ids, b))
    return out, new_cache
