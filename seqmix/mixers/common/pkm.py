"""Product-key memory layer (PKM; Lample, Sablayrolles, Ranzato, Denoyer, Jégou, "Large Memory
Layers with Product Keys", NeurIPS 2019), as the model's mlp="pkm".

For each head h (own query projection and sub-keys, one value table shared by the heads):

    q_h = W_q,h x = [q¹; q²]                               q¹, q² ∈ R^{Kh}, Kh = key_dim / 2
    I_h = top-k over (i, j) of  q¹·c¹_{h,i} + q²·c²_{h,j}    slot index i·n + j, n² slots
    w_h = softmax over I_h of those scores
    y   = Σ_h Σ_{s ∈ I_h} w_{h,s} V_s                      V ∈ R^{n² × D}

x [B, T, D] -> y [B, T, D], token by token (no state: decoding equals the parallel form).
The top-k search is `product_key_topk` (exact, over 2n sub-key scores and k'² candidates).

Sizes: `hidden` (the model's round(mlp_ratio · D)) is the wanted number of slots; the layer
uses n = ceil(√hidden) sub-keys per half, so N = n² ≥ hidden.
Simplifications against the paper: no BatchNorm on the query (batch statistics in training mix
tokens across positions and sequences, which would break causality); the values are a dense
table gathered per slot rather than an EmbeddingBag with sparse updates; value init follows
the model's `out_init` (the paper: N(0, 1/D)); sub-keys are N(0, 1/Kh).
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.mixers.common import product_keys
from seqmix.parallel import axes

Init = Callable[..., Any]
_DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


def _sub_key_params(module: nn.Module, heads: int, n: int, half: int, param_dtype):
  """The [H, 2, n, Kh] sub-key codebooks of a product-key layer, N(0, 1/Kh)."""
  init = nn.initializers.normal(stddev=half ** -0.5)
  return module.param("sub_keys", axes.param(init, axes.HEADS, None, axes.MLP, None),
                      (heads, 2, n, half), param_dtype)


class ProductKeyLayer(nn.Module):
  """What PKM and PEER share: fields, the per-head query, the sub-keys and the top-k search.

  hidden: wanted number of slots / experts; the layer holds N = ceil(√hidden)².
  heads: retrieval heads H, each with its own query projection and sub-keys.
  topk: slots per head k; at most N.
  key_dim: query/key width per head (even); None -> D rounded up to even.
  use_bias: bias on the query projection.
  dropout: dropout rate on the output (active only when not deterministic).
  kernel_init / out_init: initialisers of the query (and PEER's down vectors) / of the table
    read out (PKM's values, PEER's up vectors).
  dtype, param_dtype: compute and parameter dtypes.
  """
  hidden: int
  heads: int = 4
  topk: int = 32
  key_dim: int | None = None
  use_bias: bool = False
  dropout: float = 0.0
  kernel_init: Init = _DEFAULT_INIT
  out_init: Init = _DEFAULT_INIT
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def retrieve(self, x):
    """x [B, T, D] -> (scores [B, T, H, k] float32, slot ids [B, T, H, k], N), in `nn.compact`."""
    d = x.shape[-1]
    key_dim = self.key_dim if self.key_dim is not None else d + d % 2
    if key_dim < 2 or key_dim % 2:
      raise ValueError(f"{type(self).__name__}: key_dim={key_dim} must be even and >= 2 (two "
                       "query halves); set key_dim to an even number.")
    n = product_keys.n_sub_keys(self.hidden)
    q = nn.DenseGeneral((self.heads, key_dim), use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        kernel_init=axes.param(self.kernel_init, axes.EMBED, axes.HEADS, axes.KV),
                        bias_init=axes.param(nn.initializers.zeros, axes.HEADS, axes.KV),
                        name="query")(x)  # [b, t, h, kd]
    q = q.astype(jnp.float32).reshape(*q.shape[:-1], 2, key_dim // 2)  # [b, t, h, 2, kh]
    keys = _sub_key_params(self, self.heads, n, key_dim // 2, self.param_dtype)
    scores, idx = product_keys.product_key_topk(q, keys.astype(jnp.float32),
                                                min(self.topk, n * n))  # [b, t, h, k]
    return scores, idx, n * n


class ProductKeyMemory(ProductKeyLayer):
  """PKM: y = Σ_h Σ_{s ∈ top-k} softmax(scores)_s V_s.  x [B, T, D] -> [B, T, D].

  Fields: `ProductKeyLayer`'s, with the paper's heads 4 and topk 32 (its key_dim: 512);
  out_init initialises the value table.
  """
  heads: int = 4
  topk: int = 32

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    d = x.shape[-1]
    scores, idx, slots = self.retrieve(x)  # [b, t, h, k]
    w = jax.nn.softmax(scores, axis=-1)
    values = self.param("values", axes.param(self.out_init, axes.MLP, axes.EMBED), (slots, d),
                        self.param_dtype)
    picked = jnp.take(values, idx, axis=0).astype(self.dtype)  # [b, t, h, k, d]
    y = jnp.einsum("bthk,bthkd->btd", w.astype(self.dtype), picked)
    return nn.Dropout(self.dropout)(y, deterministic=deterministic)
