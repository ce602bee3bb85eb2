"""ReBased: Based's linear attention with a learnable quadratic kernel (Aksenov et al., "Linear
Transformers with Learnable Kernel Functions are Better In-Context Models", ACL 2024).

    q = x W_q, k = x W_k  [B,T,H,F] (F = feature_dim, 16),   v = x W_v  [B,T,H,D/H]
    x̃ = γ ⊙ LayerNorm(x) + β               (γ, β [F], shared by q and k and all heads)
    φ(x) = x̃⊗x̃ / √F                         (φ(q)·φ(k) = (q̃·k̃)² / F; no constant or linear term)
    y = [Σ_{s<=t} φ(q_t)·φ(k_s) v_s / (Σ_{s<=t} φ(q_t)·φ(k_s) + eps)] W_o

One `linear_attention.gla` call (scale 1, no decay) with a ones column appended to v gives the
numerator and the denominator (`feature_maps.normalized_linear_attention`). x̃⊗x̃ is stored in
its compact form (upper triangle, off-diagonal × √2; K = F(F+1)/2 = 136 for F = 16), exactly the
features of the authors' fla `RebasedFeatureMap`. As there, ONE affine normalisation (γ = 1,
β = 0 at init, LayerNorm eps 1e-5) is applied to both queries and keys.
Initialisation of the projections: N(0, 0.02²), output N(0, 0.02² / 2n_layers) (the Based /
ReBased training code's GPT-2 initialisation).
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import feature_maps
from seqmix.mixers.common.norms import LayerNorm
from seqmix.parallel import axes


@registry.register(
    "rebased", paper="Linear Transformers with Learnable Kernel Functions are Better In-Context "
    "Models", year=2024, venue="ACL", family="linear-attention", op="linear_attention.gla",
    parents=("based",), constant_state=True, test_kwargs={"num_heads": 2, "feature_dim": 4},
    needs_positions=True,
    url="https://arxiv.org/abs/2402.10644")
class ReBased(MixerBase):
  """Linear attention with the learnable kernel (γ LayerNorm(x) + β)².  x [B,T,D] -> y [B,T,D].

  num_heads: H; values have D/H channels per head.
  feature_dim: F, the projected q/k width per head (paper: 16).
  norm_eps: eps of the LayerNorm inside the kernel.
  eps: added to the denominator (the authors' 1e-5).
  init_std: std of the q/k/v projections; the output projection uses init_std / sqrt(2 n_layers).
  chunk_size, impl: passed to `linear_attention.gla`.
  """
  num_heads: int = 16
  feature_dim: int = 16
  norm_eps: float = 1e-5
  eps: float = 1e-5
  init_std: float = 0.02
  chunk_size: int = 64
  impl: str = "auto"

  def _check(self):
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    if self.feature_dim < 2:
      raise ValueError(f"feature_dim={self.feature_dim} must be >= 2: the kernel LayerNorm-s "
                       "the F features, which is constant for F = 1 (the paper uses 16).")

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    del max_len, dtype  # constant-size float32 state
    self._check()
    return feature_maps.init_feature_map_cache(
        batch_size, self.num_heads, feature_maps.quadratic_size(self.feature_dim),
        self.d_model // self.num_heads)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], FeatureMapCache | None)."""
    del positions, deterministic
    self._check()
    _, _, d = x.shape
    h, f = self.num_heads, self.feature_dim
    x = x.astype(self.dtype)

    def proj(features, name):
      return nn.DenseGeneral((h, features), use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name,
                             kernel_init=axes.param(nn.initializers.normal(self.init_std),
                                                    axes.EMBED, axes.HEADS, axes.KV))(x)

    q, k, v = proj(f, "q_proj"), proj(f, "k_proj"), proj(d // h, "v_proj")  # [b, t, h, f|d/h]
    norm = LayerNorm(eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     axis_name=axes.STATE, name="kernel_norm")
    phi = lambda z: feature_maps.quadratic(norm(z)) * f ** -0.5           # [b, t, h, F(F+1)/2]
    o, new_cache = feature_maps.normalized_linear_attention(
        phi(q), phi(k), v, eps=self.eps, segment_ids=segment_ids, cache=cache,
        chunk_size=self.chunk_size, impl=self.impl)
    out_std = self.init_std / math.sqrt(2 * self.n_layers)
    y = nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="o_proj",
                        kernel_init=axes.param(nn.initializers.normal(out_std), axes.HEADS,
                                               axes.KV, axes.EMBED))(o)  # [b, t, d]
    return y, new_cache
