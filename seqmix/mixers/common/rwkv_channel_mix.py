"""RWKV-6 channel mixing: the block's stateful MLP (Peng et al. 2024, "Eagle and Finch", COLM).

    xx = shift(x) − x;   x_k = x + xx ⊙ μ_k;   x_r = x + xx ⊙ μ_r
    y = sigmoid(x_r W_r) ⊙ (relu(x_k W_k)² W_v)        hidden M = W_k's width

A token-shifted squared-ReLU MLP gated by a receptance. It is stateful (the token shift needs
the previous token's input), so it follows the mixer protocol's cache convention:
`__call__(x, *, segment_ids=None, cache=None, deterministic=True) -> (y, new_cache)` and
`init_cache(batch_size, max_len, dtype)`; the class attribute `stateful = True` tells the model
to keep its cache in `BlockCache.mlp`.

Initialisation as RWKV-LM's `RWKV_CMix_x060`: μ_k = μ_r = 1 − (i/D)^(1 − layer_idx/n_layers);
W_k orthogonal (gain sqrt(M/D)), W_r and W_v zero. RWKV-6 uses M = int(3.5·D) // 32 · 32
(`rwkv_hidden`).
"""

import math
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.mixers.common.token_shift import TokenShiftCache, init_token_shift_cache, token_shift
from seqmix.parallel import axes

Init = Callable[..., Any]


class RWKVChannelMixCache(NamedTuple):
  shift: TokenShiftCache  # the previous token's input [B, D] and its segment id [B]


def rwkv_hidden(d_model: int) -> int:
  """RWKV-6's channel-mix width: int(3.5·D) rounded down to a multiple of 32 (at least 32)."""
  return max(int(3.5 * d_model) // 32 * 32, 32)


def _orthogonal_rwkv(key, shape, dtype=jnp.float32):
  """Orthogonal with RWKV's gain sqrt(out/in) when out > in (shape is [in, out])."""
  fan_in, fan_out = shape
  return nn.initializers.orthogonal(math.sqrt(max(fan_out / fan_in, 1.0)))(key, shape, dtype)


class RWKVChannelMix(nn.Module):
  """RWKV-6 channel mix.  x [B, T, D] -> (y [B, T, D], RWKVChannelMixCache | None).

  hidden: M, the squared-ReLU width (RWKV-6: `rwkv_hidden(D)` = 3.5·D rounded to 32).
  d_model: D; only needed by `init_cache` (the parameters take D from the input).
  layer_idx, n_layers: position in the stack; the token-shift mix μ at init depends on depth.
  use_bias: biases on the three projections (RWKV has none).
  dropout: dropout on the output (active only when not deterministic).
  kernel_init / out_init: None for RWKV's init (W_k orthogonal, W_r and W_v zero), or an
    initialiser for W_k and W_r / for W_v (the model's generic MLP inits).
  dtype, param_dtype: compute and parameter dtypes.
  """
  stateful: ClassVar[bool] = True
  hidden: int
  d_model: Optional[int] = None
  layer_idx: int = 0
  n_layers: int = 1
  use_bias: bool = False
  dropout: float = 0.0
  kernel_init: Optional[Init] = None
  out_init: Optional[Init] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> RWKVChannelMixCache:
    del max_len
    if self.d_model is None:
      raise ValueError("RWKVChannelMix.init_cache needs d_model (the width of the token-shift "
                       "cache); construct it with d_model=<model width>.")
    return RWKVChannelMixCache(init_token_shift_cache(batch_size, self.d_model, dtype))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, cache: Optional[RWKVChannelMixCache] = None,
               deterministic: bool = True):
    """x [B, T, D] -> (y [B, T, D], new cache or None)."""
    if not 0 <= self.layer_idx < max(self.n_layers, 1):
      raise ValueError(f"RWKVChannelMix: layer_idx={self.layer_idx} must be in "
                       f"[0, n_layers={self.n_layers}).")
    if self.hidden < 1:
      raise ValueError(f"RWKVChannelMix: hidden={self.hidden} must be positive "
                       f"(RWKV-6 uses rwkv_hidden(d_model)).")
    d = x.shape[-1]
    if self.d_model is not None and self.d_model != d:
      raise ValueError(f"RWKVChannelMix: d_model={self.d_model} but the input has width {d}.")
    r1 = 1.0 - self.layer_idx / self.n_layers
    mu0 = 1.0 - (jnp.arange(d, dtype=jnp.float32) / d) ** r1
    mu_init = lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(mu0, shape).astype(dtype)
    mu_k = self.param("time_maa_k", axes.param(mu_init, axes.EMBED), (d,), self.param_dtype)
    mu_r = self.param("time_maa_r", axes.param(mu_init, axes.EMBED), (d,), self.param_dtype)

    x = x.astype(self.dtype)
    prev, new_shift = token_shift(x, segment_ids=segment_ids,
                                  cache=None if cache is None else cache.shift)
    xx = prev - x                                                        # [b, t, d]
    xk = x + xx * mu_k.astype(self.dtype)
    xr = x + xx * mu_r.astype(self.dtype)

    def dense(features, init, in_axis, out_axis, name):
      return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name,
                      kernel_init=axes.param(init, in_axis, out_axis),
                      bias_init=axes.param(nn.initializers.zeros, out_axis))

    zeros = nn.initializers.zeros
    k = dense(self.hidden, self.kernel_init or _orthogonal_rwkv, axes.EMBED, axes.MLP, "key")(xk)
    k = jnp.square(jax.nn.relu(k))                                       # [b, t, m]
    kv = dense(d, self.out_init or zeros, axes.MLP, axes.EMBED, "value")(k)
    r = dense(d, self.kernel_init or zeros, axes.EMBED, axes.EMBED, "receptance")(xr)
    y = jax.nn.sigmoid(r) * kv
    y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    return y, None if cache is None else RWKVChannelMixCache(new_shift)
