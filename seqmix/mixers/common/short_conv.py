"""Short causal depthwise convolution (DeltaNet, Mamba, Mamba2, H3, ...), with decoding cache.

Weights follow the `causal_conv` op: `kernel[0]` multiplies the current token (torch /
Mamba conv1d weights are the time-reverse of this).
"""

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.parallel import axes
from seqmix.parallel import dispatch


class ShortConvCache(NamedTuple):
  inputs: jax.Array  # [B, L-1, D] the previous L-1 inputs, oldest first
  seg: jax.Array     # [B, L-1] int32 their segment ids (-1: padding before the first token)


def _activation(name):
  if name in (None, "none", "identity"):
    return lambda x: x
  acts = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}
  if name not in acts:
    raise ValueError(f"ShortConv activation {name!r} unknown; use one of {list(acts)} or None.")
  return acts[name]


def _conv_init(key, shape, dtype=jnp.float32):
  """PyTorch's depthwise Conv1d default: U(-1/sqrt(L), 1/sqrt(L)) with fan-in L."""
  bound = 1.0 / shape[0] ** 0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class ShortConv(nn.Module):
  """y = act(conv(u) + bias), depthwise over D channels, kernel of `kernel_size` taps.

  features: D. kernel_size: L (>= 1). use_bias: add a per-channel bias.
  activation: "silu" | "gelu" | "relu" | None. impl: the `causal_conv` impl.
  axis: logical axis name of the channel dimension.
  Segment ids mask every tap that would reach into another document.
  """
  features: int
  kernel_size: int = 4
  use_bias: bool = True
  activation: Optional[str] = "silu"
  impl: str = "auto"
  axis: str = axes.EMBED
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.kernel_size < 1:
      raise ValueError(f"ShortConv kernel_size={self.kernel_size} must be >= 1.")
    self.kernel = self.param("kernel", axes.param(_conv_init, axes.CONV, self.axis),
                             (self.kernel_size, self.features), self.param_dtype)
    if self.use_bias:
      self.bias = self.param("bias", axes.param(nn.initializers.zeros, self.axis),
                             (self.features,), self.param_dtype)

  def init_cache(self, batch_size: int, dtype=jnp.float32) -> ShortConvCache:
    l1 = self.kernel_size - 1
    return ShortConvCache(jnp.zeros((batch_size, l1, self.features), dtype),
                          jnp.full((batch_size, l1), -1, jnp.int32))

  def __call__(self, u, *, segment_ids=None, cache: Optional[ShortConvCache] = None):
    """u [B,T,D] -> (y [B,T,D], new cache or None)."""
    k = self.kernel.astype(self.dtype)
    u = u.astype(self.dtype)
    l1 = self.kernel_size - 1
    b, t, _ = u.shape
    if segment_ids is None and cache is None:
      y, _ = dispatch.causal_conv(u, k, impl=self.impl)
      new_cache = None
    elif segment_ids is None:
      y, state = dispatch.causal_conv(u, k, initial_state=cache.inputs.astype(self.dtype),
                                      impl=self.impl)
      seg = jnp.concatenate([cache.seg, jnp.zeros((b, t), jnp.int32)], axis=1)[:, t:]
      new_cache = ShortConvCache(state.astype(cache.inputs.dtype), seg)
    else:
      past = (jnp.zeros((b, l1, u.shape[-1]), u.dtype) if cache is None
              else cache.inputs.astype(u.dtype))
      past_seg = jnp.full((b, l1), -1, jnp.int32) if cache is None else cache.seg
      full = jnp.concatenate([past, u], axis=1)                     # [b, l1 + t, d]
      full_seg = jnp.concatenate([past_seg, segment_ids.astype(jnp.int32)], axis=1)
      y = jnp.zeros(u.shape, jnp.float32)
      for s in range(self.kernel_size):  # L is small: a masked shifted sum
        src = full[:, l1 - s:l1 - s + t]                            # u_{t-s}  [b, t, d]
        same = (full_seg[:, l1 - s:l1 - s + t] == segment_ids)[..., None]
        y = y + jnp.where(same, src * k[s], 0).astype(jnp.float32)
      y = y.astype(u.dtype)
      new_cache = None if cache is None else ShortConvCache(
          full[:, full.shape[1] - l1:].astype(cache.inputs.dtype), full_seg[:, full.shape[1] - l1:])
    if self.use_bias:
      y = y + self.bias.astype(y.dtype)
    return _activation(self.activation)(y), new_cache
