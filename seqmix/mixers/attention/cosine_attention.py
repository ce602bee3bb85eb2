"""Scaled cosine attention (Liu et al., CVPR 2022, "Swin Transformer V2: Scaling Up Capacity
and Resolution"; the same idea as Henry et al., Findings of EMNLP 2020, "Query-Key
Normalization for Transformers"): logits are cosine similarities times a learned per-head
scale, causal.

    q = x W_q, k = x W_k, v = x W_v                         (as `mha`, [B,T,H|G,Dh])
    q̂ = q / ||q||₂, k̂ = k / ||k||₂                          (per head; RoPE after, norm-preserving)
    τ_h = exp(min(s_h, log 100)),  s_h learned, init log 10  (Swin-v2's clamped logit scale)
    o_i = Σ_{j ≤ i} softmax_j(τ_h · q̂_i·k̂_j) v_j,   y = o W_o

Built as `mha` with a q/k transform: q̂ · τ_h · sqrt(Dh) and k̂ go to
`seqmix.ops.attention.attention`, whose default scale Dh^-1/2 cancels the sqrt(Dh). Keys are
cached normalised, so decoding is `mha`'s KV cache (or ring for `window`). Shapes:
x [B,T,D] -> y [B,T,D].

Not reproduced: Swin's relative-position bias (use mha's `position` options) and its
post-norm block layout; QKNorm's single scalar g initialised from the training length.
"""

import math

import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.attention.mha import MHA
from seqmix.parallel import axes

MAX_LOG_SCALE = math.log(100.0)


@registry.register(
    "cosine_attention", paper="Swin Transformer V2: Scaling Up Capacity and Resolution",
    year=2022, venue="CVPR", family="attention", op="attention.attention", parents=("mha",),
    constant_state=False, test_kwargs={"num_heads": 4, "num_kv_heads": 2},
    url="https://arxiv.org/abs/2111.09883")
class CosineAttention(MHA):
  """Cosine-similarity attention with a learned clamped per-head scale (module docstring);
  every MHA field (qk_norm must stay False: the L2 normalisation replaces it).

  init_log_scale: initial s_h (log 10, Swin-v2).
  eps: added to the norms.
  """
  init_log_scale: float = math.log(10.0)
  eps: float = 1e-6

  def _dims(self):
    if self.qk_norm:
      raise ValueError("cosine_attention: qk_norm=True would RMS-normalise before the L2 "
                       "normalisation, which discards it; set qk_norm=False.")
    return super()._dims()

  def _transform_qk(self, q, k):
    h, dh = q.shape[2], q.shape[3]
    s = self.param("logit_scale", axes.param(lambda _k, shape: jnp.full(
        shape, self.init_log_scale, self.param_dtype), axes.HEADS), (h,))
    tau = jnp.exp(jnp.minimum(s, MAX_LOG_SCALE)) * math.sqrt(dh)     # [h]
    unit = lambda u: u / (jnp.linalg.norm(u.astype(jnp.float32), axis=-1, keepdims=True)
                          + self.eps).astype(u.dtype)
    return unit(q) * tau[:, None].astype(q.dtype), unit(k)
