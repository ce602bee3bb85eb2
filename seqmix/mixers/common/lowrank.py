"""Low-rank projections: x [..., D] -> act(x A) B (+ bias), rank r << D.

GLA's per-key forget gate (`D -> 16 -> K·H`, bias on the second factor) and RWKV-6's
data-dependent LoRAs (`D -> 32 -> D` with tanh between, five of them sharing one input for the
token-shift interpolation, one more for the decay) are all this module. With `n` set, `n`
independent low-rank maps share the input and are computed as one matmul per factor:
`A [D, n·r]`, `B [n, r, F]`, output `[..., n, F]`.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.parallel import axes

Init = Callable[..., Any]

_ACTIVATIONS = {"tanh": jnp.tanh, "silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid,
                "relu": jax.nn.relu}


class LowRank(nn.Module):
  """y = act(x A) B + bias.  x [..., D] -> y [..., F] (or [..., n, F] with `n`).

  features: F, the output width.
  rank: r, the inner width (GLA: 16; RWKV-6: 32 for the token-shift LoRAs, 64 for the decay).
  n: None, or the number of independent low-rank maps sharing the input (output gains an axis).
  activation: None (GLA's gate), "tanh" (RWKV-6), "silu", "sigmoid" or "relu", applied to x A.
  use_bias: add a learned bias [F] (or [n, F]) after B (GLA's gate has one).
  down_init / up_init: initialisers of A [D, n·r] and B [n, r, F] ([r, F] when n is None);
    RWKV-6 zero-initialises B so its LoRAs start as the identity of their base value.
  bias_init: initialiser of the bias.
  in_axis / out_axis: logical axis names of D and F (the rank axis is replicated).
  dtype, param_dtype: compute and parameter dtypes.
  """
  features: int
  rank: int
  n: Optional[int] = None
  activation: Optional[str] = None
  use_bias: bool = False
  down_init: Init = nn.initializers.lecun_normal()
  up_init: Init = nn.initializers.lecun_normal()
  bias_init: Init = nn.initializers.zeros
  in_axis: str = axes.EMBED
  out_axis: str = axes.EMBED
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.rank < 1 or self.features < 1 or (self.n is not None and self.n < 1):
      raise ValueError(f"LowRank: rank={self.rank}, features={self.features} and n={self.n} must "
                       f"be positive (n may be None).")
    if self.activation is not None and self.activation not in _ACTIVATIONS:
      raise ValueError(f"LowRank activation {self.activation!r} unknown; use one of "
                       f"{sorted(_ACTIVATIONS)} or None.")
    n = 1 if self.n is None else self.n
    d = x.shape[-1]
    a = self.param("down", axes.param(self.down_init, self.in_axis, axes.NONE), (d, n * self.rank),
                   self.param_dtype)
    up_shape = (self.rank, self.features) if self.n is None else (n, self.rank, self.features)
    up_axes = (axes.NONE, self.out_axis) if self.n is None else (axes.NONE, axes.NONE,
                                                                  self.out_axis)
    b = self.param("up", axes.param(self.up_init, *up_axes), up_shape, self.param_dtype)
    x = x.astype(self.dtype)
    h = jnp.einsum("...d,dr->...r", x, a.astype(self.dtype))           # [..., n·r]
    if self.activation is not None:
      h = _ACTIVATIONS[self.activation](h)
    if self.n is None:
      y = jnp.einsum("...r,rf->...f", h, b.astype(self.dtype))          # [..., f]
    else:
      h = h.reshape(*h.shape[:-1], n, self.rank)                        # [..., n, r]
      y = jnp.einsum("...nr,nrf->...nf", h, b.astype(self.dtype))       # [..., n, f]
    if self.use_bias:
      bias_axes = (self.out_axis,) if self.n is None else (axes.NONE, self.out_axis)
      bias_shape = (self.features,) if self.n is None else (n, self.features)
      bias = self.param("bias", axes.param(self.bias_init, *bias_axes), bias_shape,
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y
