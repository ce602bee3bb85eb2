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

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.mixers.common import pkm
from seqmix.parallel import axes


class PEER(pkm.ProductKeyLayer):
  """y = Σ_h Σ_{s ∈ top-k} softmax(scores)_s gelu(u_sᵀ x) v_s.  x [B, T, D] -> [B, T, D].

  Fields: `pkm.ProductKeyLayer`'s, with the paper's heads 8 and topk 16 (its key_dim: 256);
  hidden is the wanted number of single-neuron experts; kernel_init initialises the query and
  the down vectors u, out_init the up vectors v.
  """
  heads: int = 8
  topk: int = 16

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    d = x.shape[-1]
    scores, idx, experts = self.retrieve(x)  # [b, t, h, k]
    g = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    down = self.param("down", axes.param(self.kernel_init, axes.MLP, axes.EMBED), (experts, d),
                      self.param_dtype)
    up = self.param("up", axes.param(self.out_init, axes.MLP, axes.EMBED), (experts, d),
                    self.param_dtype)
    u = jnp.take(down, idx, axis=0).astype(self.dtype)  # [b, t, h, k, d]
    v = jnp.take(up, idx, axis=0).astype(self.dtype)  # [b, t, h, k, d]
    a = jax.nn.gelu(jnp.einsum("btd,bthkd->bthk", x.astype(self.dtype), u), approximate=False)
    y = jnp.einsum("bthk,bthkd->btd", g * a, v)
    return nn.Dropout(self.dropout)(y, deterministic=deterministic)
