"""Mamba: the selective SSM block (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces", COLM 2024), through `seqmix.ops.ssm.selective_scan`.

    [x, z] = u W_in                                  [B, T, E·D] each (E = expand, no bias)
    x = silu(ShortConv_4(x))                         depthwise causal conv with bias
    [δ, B, C] = x W_x                                δ [B, T, R], B, C [B, T, N]; R = dt_rank = ⌈D/16⌉
    (δ, B, C <- rms(δ), rms(B), rms(C)                 Falcon-Mamba, with bcdt_rms_eps set)
    Δ = softplus(δ W_dt + b_dt)                      [B, T, E·D]
    A = −exp(A_log)  [E·D, N];  h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_t;  y_t = C_t h_t + D ⊙ x_t
    out = (y ⊙ silu(z)) W_out

Initialisation as mamba_ssm's `Mamba`: A_log = log(1..N) per channel (S4D-real), D = 1, b_dt =
softplus⁻¹(Δ₀) with Δ₀ ~ LogUniform(dt_min, dt_max) floored at dt_init_floor, W_dt ~
U(±dt_scale/√R) ("random") or the constant dt_scale/√R ("constant"), other projections PyTorch's
default U(±1/√fan_in); W_out is further divided by √n_layers (mamba_ssm's `_init_weights` with
rescale_prenorm_residual). The block has no MLP: configure the model with mlp="none".

Packed documents: the mixer passes `reset` (True at each document's first token, also across a
decoding cache's boundary) to `selective_scan`, which zeroes the state before that token.
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import norms, segments
from seqmix.mixers.common.short_conv import ShortConv, ShortConvCache
from seqmix.mixers.linear.mamba2 import TORCH_LINEAR_INIT, dt_bias_init
from seqmix.parallel import axes
from seqmix.parallel import dispatch

class MambaCache(NamedTuple):
  conv: ShortConvCache  # the short conv's last L−1 inputs [B, L−1, E·D] and their segment ids
  state: jax.Array      # [B, E·D, N] float32 SSM state
  seg: jax.Array        # [B] int32 segment id of the last token seen (-1 before the first)


def s4d_real_init(key, shape, dtype=jnp.float32):
  """A_log [D, N] = log(1, 2, ..., N) for every channel (A = −(1..N), S4D-Real)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32)),
                          shape).astype(dtype)


def dt_proj_init(kind: str, std: float):
  """W_dt [R, E·D]: U(−std, std) ("random") or the constant std ("constant"), as mamba_ssm."""
  def init(key, shape, dtype=jnp.float32):
    if kind == "constant":
      return jnp.full(shape, std, dtype)
    return jax.random.uniform(key, shape, jnp.float32, -std, std).astype(dtype)
  return init


@registry.register(
    "mamba", paper="Mamba: Linear-Time Sequence Modeling with Selective State Spaces", year=2023,
    venue="COLM", family="ssm", op="ssm.selective_scan + conv.causal_conv", parents=("s4d", "h3"),
    constant_state=True, test_kwargs={"d_state": 8, "expand": 2},
    url="https://arxiv.org/abs/2312.00752", sequence_parallel=True)
class Mamba(MixerBase):
  """Mamba (S6) block.  x [B, T, D] -> y [B, T, D].

  d_state: N, the SSM state size per channel (16).
  d_conv: taps of the short causal conv (4).
  expand: E, inner width E·D (2).
  dt_rank: R, rank of the Δ projection (None: ⌈d_model/16⌉).
  dt_min, dt_max, dt_init_floor: Δ at init ~ LogUniform(dt_min, dt_max), >= dt_init_floor.
  dt_init: "random" | "constant" init of W_dt; dt_scale: its scale (1).
  conv_bias: bias in the short conv (True). bias: biases on W_in / W_out (False).
  bcdt_rms_eps: None (off), or eps: δ, B and C are each RMS-normalised (no learned scale) right
    after W_x, as Falcon-Mamba does.
  chunk_size, impl: passed to `ssm.selective_scan`; conv_impl to `conv.causal_conv`.
  """
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | None = None
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  dt_init_floor: float = 1e-4
  dt_init: str = "random"
  dt_scale: float = 1.0
  conv_bias: bool = True
  bias: bool = False
  bcdt_rms_eps: float | None = None
  chunk_size: int = 64
  impl: str = "auto"
  conv_impl: str = "auto"

  def _dims(self):
    """(d_inner, dt_rank) after checking the configuration."""
    for name in ("d_state", "d_conv", "expand"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"mamba: {name}={v!r} must be an int >= 1 (defaults: d_state=16, "
                         f"d_conv=4, expand=2).")
    rank = math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank
    if rank < 1:
      raise ValueError(f"mamba: dt_rank={self.dt_rank} must be >= 1 (or None for "
                       f"ceil(d_model/16) = {math.ceil(self.d_model / 16)}).")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"mamba: need 0 < dt_min <= dt_max; got dt_min={self.dt_min}, "
                       f"dt_max={self.dt_max} (defaults 1e-3, 1e-1).")
    if self.dt_init not in ("random", "constant"):
      raise ValueError(f"mamba: dt_init={self.dt_init!r} must be 'random' or 'constant'.")
    return self.expand * self.d_model, rank

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> MambaCache:
    del max_len  # constant-size state
    d_inner, _ = self._dims()
    l1 = self.d_conv - 1
    conv = ShortConvCache(jnp.zeros((batch_size, l1, d_inner), dtype),
                          jnp.full((batch_size, l1), -1, jnp.int32))
    return MambaCache(conv, jnp.zeros((batch_size, d_inner, self.d_state), jnp.float32),
                      jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], MambaCache | None)."""
    del positions, deterministic
    d_inner, rank = self._dims()
    b = x.shape[0]
    n = self.d_state
    pd = self.param_dtype

    def dense(features, init, in_axis, out_axis, name, use_bias=False):
      return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=pd, name=name,
                      kernel_init=axes.param(init, in_axis, out_axis),
                      bias_init=axes.param(nn.initializers.zeros, out_axis))

    x = x.astype(self.dtype)
    xz = dense(2 * d_inner, TORCH_LINEAR_INIT, axes.EMBED, axes.HEADS, "in_proj",
               self.bias)(x)
    xs, z = jnp.split(xz, 2, axis=-1)                                    # [b, t, e·d] each
    xs, conv_cache = ShortConv(d_inner, self.d_conv, use_bias=self.conv_bias, activation="silu",
                               impl=self.conv_impl, axis=axes.HEADS, dtype=self.dtype,
                               param_dtype=pd, name="conv1d")(
                                   xs, segment_ids=segment_ids,
                                   cache=None if cache is None else cache.conv)
    x_dbl = dense(rank + 2 * n, TORCH_LINEAR_INIT, axes.HEADS, axes.NONE, "x_proj")(xs)
    dt, bm, cm = jnp.split(x_dbl, [rank, rank + n], axis=-1)            # [b, t, r], [b, t, n] x2
    if self.bcdt_rms_eps is not None:
      rms = lambda v: norms.rms_normalise(v.astype(jnp.float32), self.bcdt_rms_eps).astype(v.dtype)
      dt, bm, cm = rms(dt), rms(bm), rms(cm)
    dt_std = self.dt_scale * rank ** -0.5
    dt_w = self.param("dt_proj", axes.param(dt_proj_init(self.dt_init, dt_std), axes.NONE,
                                            axes.HEADS), (rank, d_inner), pd)
    dt = jnp.einsum("btr,rd->btd", dt.astype(jnp.float32), dt_w.astype(jnp.float32))
    dt_bias = self.param("dt_bias", axes.param(
        dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor), axes.HEADS), (d_inner,), pd)
    a_log = self.param("A_log", axes.param(s4d_real_init, axes.HEADS, axes.STATE),
                       (d_inner, n), pd)
    d_skip = self.param("D", axes.param(nn.initializers.ones, axes.HEADS), (d_inner,), pd)

    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    a = -jnp.exp(a_log.astype(jnp.float32))                              # [e·d, n]
    y, state = dispatch.selective_scan(
        xs, dt, a, bm, cm, None, delta_bias=dt_bias.astype(jnp.float32), delta_softplus=True,
        initial_state=None if cache is None else cache.state, reset=starts,
        chunk_size=self.chunk_size, impl=self.impl)
    y = y.astype(jnp.float32) + d_skip.astype(jnp.float32) * xs.astype(jnp.float32)
    y = (y * jax.nn.silu(z.astype(jnp.float32))).astype(self.dtype)
    out = dense(self.d_model, nn.initializers.variance_scaling(
        1.0 / (3.0 * max(self.n_layers, 1)), "fan_in", "uniform"), axes.HEADS, axes.EMBED,
        "out_proj", self.bias)(y)
    new_cache = None if cache is None else MambaCache(
        conv_cache, state, segments.last_segment_id(segment_ids, b))
    return out, new_cache
