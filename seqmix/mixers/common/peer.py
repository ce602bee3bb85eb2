"""PEER, parameter-efficient expert retrieval (Xu Owen He, "Mixture of A Million Experts",
arXiv 2024), as the model's mlp="peer".

N = n² experts, each a single hidden neuron e_s(x) = σ(u_sᵀ x) v_s (u_s, v_s ∈ R^D). Each head
h has its own query projection and product sub-keys; the heads share the expert pool:

    q_h = W_q,h x = [q¹; q²]
    I_h = top-k over (i, j) of  q¹·c¹_{h,i} + q²·c²_{h,j}    expert index s = i·n + j
    g_h = softmax over I_h of those scores
    y   = Σ_h Σ_{s ∈ I_h} g_{h,s} σ(u_sᵀ x) v_s

x [B, T, D] -> y [B, T, D], token by token (no state: decoding equals the parallel form).
The retrieval is `product_key_topk` (exact top-k, shared with the PKM layer).

Sizes: `hidden` (the model's round(mlp_ratio · D)) is the wanted number of experts; the layer
uses n = ceil(√hidden) sub-keys per half, N = n² ≥ hidden, so at mlp_ratio 4 it holds about
as many down/up parameters (2·D per expert) as a GELU MLP of hidden 4·D.
Simplifications against the paper: no BatchNorm on the query (batch statistics mix tokens
across positions, which would break causality); σ is GELU (erf); experts are dense [N, D]
tables gathered per token.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.mixers.common import pkm
from seqmix.mixers.common import product_keys
from seqmix.parallel import axes

Init = Callable[..., Any]
_DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


class PEER(nn.Module):
  """y = Σ_h Σ_{s ∈ top-k} softmax(scores)_s gelu(u_sᵀ x) v_s.  x [B, T, D] -> [B, T, D].

  hidden: wanted number of single-neuron experts; N = ceil(√hidden)².
  heads: retrieval heads H (paper: 8), each with its own query and sub-keys.
  topk: experts per head k (paper: 16); at most N.
  key_dim: query/key width per head (even; paper: 256); None -> D rounded up to even.
  use_bias: bias on the query projection.
  dropout: dropout rate on the output (active only when not deterministic).
  kernel_init / out_init: initialisers of the query and down vectors u / of the up vectors v.
  dtype, param_dtype: compute and parameter dtypes.
  """
  hidden: int
  heads: int = 8
  topk: int = 16
  key_dim: int | None = None
  use_bias: bool = False
  dropout: float = 0.0
  kernel_init: Init = _DEFAULT_INIT
  out_init: Init = _DEFAULT_INIT
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    d = x.shape[-1]
    key_dim = self.key_dim if self.key_dim is not None else d + d % 2
    pkm.check_key_dim("PEER", key_dim)
    n = product_keys.n_sub_keys(self.hidden)
    q = pkm.product_key_query(self, x, self.heads, key_dim, init=self.kernel_init,
                              use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    keys = pkm.sub_key_params(self, self.heads, n, key_dim // 2, self.param_dtype)
    scores, idx = product_keys.product_key_topk(q, keys.astype(jnp.float32),
                                                min(self.topk, n * n))  # [b, t, h, k]
    g = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    down = self.param("down", axes.param(self.kernel_init, axes.MLP, axes.EMBED), (n * n, d),
                      self.param_dtype)
    up = self.param("up", axes.param(self.out_init, axes.MLP, axes.EMBED), (n * n, d),
                    self.param_dtype)
    u = jnp.take(down, idx, axis=0).astype(self.dtype)  # [b, t, h, k, d]
    v = jnp.take(up, idx, axis=0).astype(self.dtype)  # [b, t, h, k, d]
    a = jax.nn.gelu(jnp.einsum("btd,bthkd->bthk", x.astype(self.dtype), u), approximate=False)
    y = jnp.einsum("bthk,bthkd->btd", g * a, v)
    return nn.Dropout(self.dropout)(y, deterministic=deterministic)
