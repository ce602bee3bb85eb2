"""Channel MLPs of a block: SwiGLU (LLaMA) and GELU (GPT-2 / nanoGPT; `GeluTanhMLP` is GPT-2's
tanh-approximate `gelu_new`).

Both map x [B, T, D] -> [B, T, D] through a hidden width M and take `deterministic`
for dropout. Kernels carry logical axes (embed, mlp) / (mlp, embed). `out_init` lets the
model scale the output projection (GPT-2's 1/sqrt(2·n_layers) residual scaling).
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.parallel import axes

Init = Callable[..., Any]
_DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


def _dense(features, in_axis, out_axis, *, use_bias, init, dtype, param_dtype, name):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=axes.param(init, in_axis, out_axis),
                  bias_init=axes.param(nn.initializers.zeros, out_axis), name=name)


class SwiGLU(nn.Module):
  """y = W_o (act(x W_g) ⊙ x W_u), act = silu.  x [B, T, D] -> [B, T, D], hidden M = `hidden`.

  hidden: hidden width M.
  use_bias: biases on the three projections.
  dropout: dropout rate on the output (active only when not deterministic).
  kernel_init / out_init: initialisers of the input and output projections.
  dtype, param_dtype: compute and parameter dtypes.
  """
  hidden: int
  use_bias: bool = False
  dropout: float = 0.0
  kernel_init: Init = _DEFAULT_INIT
  out_init: Init = _DEFAULT_INIT
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @staticmethod
  def _act(x):
    return jax.nn.silu(x)

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = _dense(self.hidden, axes.EMBED, axes.MLP, init=self.kernel_init, name="wi_gate", **kw)(x)
    up = _dense(self.hidden, axes.EMBED, axes.MLP, init=self.kernel_init, name="wi_up", **kw)(x)
    h = self._act(gate) * up  # [b, t, m]
    y = _dense(x.shape[-1], axes.MLP, axes.EMBED, init=self.out_init, name="wo", **kw)(h)
    return nn.Dropout(self.dropout)(y, deterministic=deterministic)


class GeluMLP(nn.Module):
  """y = W_o gelu(x W_i).  x [B, T, D] -> [B, T, D], hidden M = `hidden`.

  hidden: hidden width M (GPT-2: 4·D).
  approximate: tanh approximation of GELU (GPT-2's TF code); nanoGPT uses the exact erf
    form (`nn.GELU()`), the default here.
  use_bias, dropout, kernel_init, out_init, dtype, param_dtype: as in `SwiGLU`.
  """
  hidden: int
  approximate: bool = False
  use_bias: bool = False
  dropout: float = 0.0
  kernel_init: Init = _DEFAULT_INIT
  out_init: Init = _DEFAULT_INIT
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    h = _dense(self.hidden, axes.EMBED, axes.MLP, init=self.kernel_init, name="wi", **kw)(x)
    h = jax.nn.gelu(h, approximate=self.approximate)  # [b, t, m]
    y = _dense(x.shape[-1], axes.MLP, axes.EMBED, init=self.out_init, name="wo", **kw)(h)
    return nn.Dropout(self.dropout)(y, deterministic=deterministic)


class GeluTanhMLP(GeluMLP):
  """GeluMLP with the tanh approximation of GELU (GPT-2's `gelu_new`, Hugging Face's
  `gelu_pytorch_tanh`): gelu(h) ≈ ½h(1 + tanh(√(2/π)(h + 0.044715h³))). The model's
  mlp="gelu_tanh"; a separate name because the model builds MLPs from shared fields only.
  """
  approximate: bool = True


class GeGLU(SwiGLU):
  """y = W_o (gelu_tanh(x W_g) ⊙ x W_u): SwiGLU with the tanh-approximate GELU gate (Gemma,
  Griffin / RecurrentGemma's MLP block). The model's mlp="geglu"; parameters as SwiGLU's.
  """

  @staticmethod
  def _act(x):
    return jax.nn.gelu(x, approximate=True)
