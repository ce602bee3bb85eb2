"""Normalisation layers shared by models and mixers: RMSNorm, LayerNorm, gated RMSNorm.

Statistics are always computed in float32 whatever the input dtype (bf16 variances lose
too many bits); the result is cast to `dtype` (None: the input's dtype). The scale (and
bias) parameters carry logical axis names (`axis_name`, default `embed`) so a mixer that
normalises a head dim can name it `kv` instead.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.parallel import axes


def _rms_normalise(x32, eps: float):
  """x32 [..., D] float32 -> x / sqrt(mean(x²) + eps) over the last axis."""
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x²) + eps) · (scale_offset + scale) over the last axis.  x [..., D].

  eps: added to the mean square.
  use_scale: learn a per-channel scale (init 1 − scale_offset, so the norm starts as plain RMS
    normalisation).
  scale_offset: 0 (default); 1 is Gemma / RecurrentGemma's `x · (1 + w)` parameterisation
    (the model's norm="rmsnorm_1p"), whose learned w is 0 at init.
  dtype: output dtype (None: the input's dtype); statistics are float32.
  param_dtype: dtype of the scale.
  axis_name: logical axis name of the normalised dimension.
  """
  eps: float = 1e-6
  use_scale: bool = True
  scale_offset: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: str = axes.EMBED

  @nn.compact
  def __call__(self, x):
    out_dtype = self.dtype or x.dtype
    y = _rms_normalise(x.astype(jnp.float32), self.eps)
    if self.use_scale:
      init = nn.initializers.constant(1.0 - self.scale_offset)
      scale = self.param("scale", axes.param(init, self.axis_name), (x.shape[-1],),
                         self.param_dtype)
      scale = jnp.asarray(scale, jnp.float32)
      y = y * (scale + self.scale_offset if self.scale_offset else scale)
    return y.astype(out_dtype)


class LayerNorm(nn.Module):
  """y = (x − mean) / sqrt(var + eps) · scale + bias over the last axis.  x [..., D].

  eps: added to the variance.
  use_bias: learn an additive bias (nanoGPT's `bias=False` drops it).
  use_scale: learn a per-channel scale.
  dtype: output dtype (None: the input's dtype); statistics are float32.
  param_dtype: dtype of scale and bias.
  axis_name: logical axis name of the normalised dimension.
  """
  eps: float = 1e-5
  use_bias: bool = True
  use_scale: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: str = axes.EMBED

  @nn.compact
  def __call__(self, x):
    out_dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    # Two-pass variance: E[(x−μ)²] avoids the cancellation of E[x²] − μ².
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    d = x.shape[-1]
    if self.use_scale:
      scale = self.param("scale", axes.param(nn.initializers.ones, self.axis_name), (d,),
                         self.param_dtype)
      y = y * jnp.asarray(scale, jnp.float32)
    if self.use_bias:
      bias = self.param("bias", axes.param(nn.initializers.zeros, self.axis_name), (d,),
                        self.param_dtype)
      y = y + jnp.asarray(bias, jnp.float32)
    return y.astype(out_dtype)


class GatedRMSNorm(nn.Module):
  """RMSNorm gated by silu(z), optionally per group of channels.  x, z [..., D] -> [..., D].

  norm_before_gate=True:  y = rmsnorm(x) · scale · silu(z)   (GLA / fla `FusedRMSNormGated`)
  norm_before_gate=False: y = rmsnorm(x · silu(z)) · scale   (Mamba2's `RMSNormGated` default)

  group_size: normalise each consecutive group of `group_size` channels on its own (Mamba2's
    `ngroups` norm; a per-head norm when `group_size` is the head dim). None: the whole axis.
    D must be a multiple of it.
  eps, use_scale, dtype, param_dtype, axis_name: as in `RMSNorm`; the scale is [D].
  """
  eps: float = 1e-6
  group_size: int | None = None
  norm_before_gate: bool = True
  use_scale: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: str = axes.EMBED

  @nn.compact
  def __call__(self, x, z):
    if x.shape != z.shape:
      raise ValueError(f"GatedRMSNorm: x and gate z must have one shape; got {x.shape=}, "
                       f"{z.shape=}.")
    out_dtype = self.dtype or x.dtype
    d = x.shape[-1]
    g = self.group_size or d
    if d % g:
      raise ValueError(f"GatedRMSNorm: group_size={g} must divide the channel count {d}; "
                       f"use a divisor of {d} or group_size=None.")
    x32, gate = x.astype(jnp.float32), jax.nn.silu(z.astype(jnp.float32))
    if not self.norm_before_gate:
      x32 = x32 * gate
    y = _rms_normalise(x32.reshape(*x.shape[:-1], d // g, g), self.eps)  # [..., D/g, g]
    y = y.reshape(x.shape)  # [..., D]
    if self.use_scale:
      scale = self.param("scale", axes.param(nn.initializers.ones, self.axis_name), (d,),
                         self.param_dtype)
      y = y * jnp.asarray(scale, jnp.float32)
    if self.norm_before_gate:
      y = y * gate
    return y.astype(out_dtype)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm, "rmsnorm_1p": RMSNorm}


def make_norm(kind: str, *, eps: float, use_bias: bool, dtype, param_dtype, name=None):
  """The model's norm by config name ("rmsnorm" | "layernorm" | "rmsnorm_1p": RMSNorm scaled by
  1 + w, Gemma's); RMSNorm has no bias."""
  if kind not in NORMS:
    raise ValueError(f"norm={kind!r} is not one of {sorted(NORMS)}.")
  if kind == "layernorm":
    return LayerNorm(eps=eps, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name)
  return RMSNorm(eps=eps, scale_offset=1.0 if kind == "rmsnorm_1p" else 0.0, dtype=dtype,
                 param_dtype=param_dtype, name=name)
