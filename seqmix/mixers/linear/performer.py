"""Performer: causal FAVOR+ attention with positive orthogonal random features (Choromanski et
al., "Rethinking Attention with Performers", ICLR 2021).

    q = x W_q, k = x W_k, v = x W_v  [B,T,H,D/H]
    φ(x) = (exp(w_i·x' − |x'|²/2) + ε_f) / √m,  x' = x / (D/H)^¼,  i = 1..m   (w_i fixed, random)
    y = [Σ_{s<=t} φ(q_t)·φ(k_s) v_s / (Σ_{s<=t} φ(q_t)·φ(k_s) + eps)] W_o

E[φ(q)·φ(k)] ∝ exp(q·k / √(D/H)), the softmax kernel, so the output is an unbiased-kernel
estimate of causal softmax attention. The causal (prefix-sum) form is one
`linear_attention.gla` call (scale 1, no decay) with a ones column appended to v: the last
output column is the denominator (`feature_maps.normalized_linear_attention`).

Random features. w `[m, D/H]` (shared by all heads, as in the official JAX code) comes from
`feature_maps.orthogonal_gaussian((feature_seed, layer_idx), m, D/H)`: a host-side constant
drawn once from the seed, not a variable. It is therefore identical in the parallel form, in
every decoding call and after a checkpoint restore, no gradient or weight decay reaches it,
and layers differ through layer_idx. The paper's optional periodic redrawing during training
is not done (features stay fixed, as the issue asks). Query features subtract their own max
exponent (it cancels in the ratio); the official code's key stabiliser, a max over all keys of
the sequence, is left out because it is not causal (see `feature_maps.favor_positive`).
Projections: lecun-normal kernels with zero biases (Flax's `DenseGeneral` defaults, which the
official JAX implementation uses).
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import feature_maps
from seqmix.parallel import axes


@registry.register(
    "performer", paper="Rethinking Attention with Performers", year=2021, venue="ICLR",
    family="linear-attention", op="linear_attention.gla", parents=("linear_transformer",),
    constant_state=True, test_kwargs={"num_heads": 2, "num_features": 24},
    needs_positions=True,
    url="https://arxiv.org/abs/2009.14794", sequence_parallel=True)
class Performer(MixerBase):
  """Causal FAVOR+ attention.  x [B,T,D] -> y [B,T,D].

  num_heads: H; q, k, v have D/H channels per head.
  num_features: m random features (None: round((D/H) · ln(D/H)), the paper's m = Θ(d log d)).
  feature_seed: seed of the fixed random features (with layer_idx).
  feature_eps: ε_f added to every feature (the official code's 1e-4, keeps the denominator
    away from 0 when every exponent underflows).
  eps: added to the denominator.
  use_bias: biases on the q/k/v/output projections.
  chunk_size, impl: passed to `linear_attention.gla`.
  """
  num_heads: int = 8
  num_features: int | None = None
  feature_seed: int = 0
  feature_eps: float = 1e-4
  eps: float = 1e-6
  use_bias: bool = True
  chunk_size: int = 64
  impl: str = "auto"

  def _dims(self):
    """(H, D/H, m) after checking the configuration."""
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    hd = self.d_model // self.num_heads
    m = self.num_features or max(1, round(hd * math.log(hd)))
    if m < 1:
      raise ValueError(f"num_features={self.num_features} must be >= 1 (or None for "
                       f"round(d ln d) = {max(1, round(hd * math.log(hd)))}).")
    return self.num_heads, hd, m

  def projection(self):
    """The fixed random features w `[m, D/H]` float32 of this layer."""
    _, hd, m = self._dims()
    return feature_maps.orthogonal_gaussian((self.feature_seed, self.layer_idx), m, hd)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    del max_len, dtype  # constant-size float32 state
    h, hd, m = self._dims()
    return feature_maps.init_feature_map_cache(batch_size, h, m, hd)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], FeatureMapCache | None)."""
    del positions, deterministic
    h, hd, _ = self._dims()
    d = x.shape[-1]
    x = x.astype(self.dtype)

    def proj(name):
      return nn.DenseGeneral((h, hd), use_bias=self.use_bias, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name,
                             kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED,
                                                    axes.HEADS, axes.KV),
                             bias_init=axes.param(nn.initializers.zeros, axes.HEADS, axes.KV))(x)

    q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")              # [b, t, h, d/h]
    w = jnp.asarray(self.projection())                                    # [m, d/h]
    phi_q = feature_maps.favor_positive(q, w, is_query=True, eps=self.feature_eps)
    phi_k = feature_maps.favor_positive(k, w, is_query=False, eps=self.feature_eps)
    o, new_cache = feature_maps.normalized_linear_attention(
        phi_q.astype(self.dtype), phi_k.astype(self.dtype), v, eps=self.eps,
        segment_ids=segment_ids, cache=cache, chunk_size=self.chunk_size, impl=self.impl)
    y = nn.DenseGeneral(d, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="o_proj",
                        kernel_init=axes.param(nn.initializers.lecun_normal(), axes.HEADS,
                                               axes.KV, axes.EMBED),
                        bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(o)  # [b, t, d]
    return y, new_cache
