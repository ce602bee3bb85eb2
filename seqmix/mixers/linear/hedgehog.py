"""Hedgehog: linear attention with a learnable softmax-mimicking feature map (Zhang et al., "The
Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry", ICLR 2024).

    q = x W_q, k = x W_k, v = x W_v  [B,T,H,D/H]
    φ_q(x) = [softmax(x A_h + a_h), softmax(−(x A_h + a_h))]   (A_h [D/H, F] per head; φ_k has
                                                                its own B_h, b_h)
    y = [Σ_{s<=t} φ_q(q_t)·φ_k(k_s) v_s / (Σ_{s<=t} φ_q(q_t)·φ_k(k_s) + eps)] W_o

One `linear_attention.gla` call (scale 1, no decay) with a ones column appended to v gives the
numerator and the denominator (`feature_maps.normalized_linear_attention`); every feature is in
(0, 1), so the denominator is positive.

Training. The paper trains the feature maps to mimic softmax attention with a distillation
loss (cross-entropy between softmax and Hedgehog attention weights) when converting a
pretrained Transformer, or end-to-end when training from scratch. Here the maps are ordinary
parameters trained end-to-end with the model; the distillation loss is out of scope.
Initialisation: A_h = B_h = I (feature_dim = head dim) and zero biases, so the maps start as
[softmax(x), softmax(−x)] (the paper's and fla's identity init); projections N(0, 0.02²), the
output projection N(0, 0.02² / 2n_layers) (GPT-2 style, as the authors' training code).
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import feature_maps
from seqmix.parallel import axes


@registry.register(
    "hedgehog", paper="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax "
    "Mimicry", year=2024, venue="ICLR", family="linear-attention", op="linear_attention.gla",
    parents=("linear_transformer",), constant_state=True, test_kwargs={"num_heads": 2},
    needs_positions=True,
    url="https://arxiv.org/abs/2402.04347", sequence_parallel=True)
class Hedgehog(MixerBase):
  """Linear attention with learnable [softmax(xW), softmax(−xW)] maps.  x [B,T,D] -> y [B,T,D].

  num_heads: H; q, k, v have D/H channels per head.
  feature_dim: F, outputs of each softmax (None: D/H; the map then has 2F = 2D/H features).
  map_bias: learn the maps' biases a_h, b_h (zero at init).
  identity_init: A_h = B_h = I at init (needs feature_dim = D/H); otherwise lecun-normal.
  eps: added to the denominator (the authors' 1e-12).
  init_std: std of the q/k/v projections; the output projection uses init_std / sqrt(2 n_layers).
  chunk_size, impl: passed to `linear_attention.gla`.
  """
  num_heads: int = 12
  feature_dim: int | None = None
  map_bias: bool = True
  identity_init: bool = True
  eps: float = 1e-12
  init_std: float = 0.02
  chunk_size: int = 64
  impl: str = "auto"

  def _dims(self):
    """(H, D/H, F) after checking the configuration."""
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    hd = self.d_model // self.num_heads
    f = self.feature_dim or hd
    if self.identity_init and f != hd:
      raise ValueError(f"identity_init needs feature_dim == head dim d_model/num_heads = {hd}, "
                       f"got feature_dim={f}; set feature_dim=None or identity_init=False.")
    return self.num_heads, hd, f

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    del max_len, dtype  # constant-size float32 state
    h, hd, f = self._dims()
    return feature_maps.init_feature_map_cache(batch_size, h, 2 * f, hd)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], FeatureMapCache | None)."""
    del positions, deterministic
    h, hd, f = self._dims()
    d = x.shape[-1]
    x = x.astype(self.dtype)

    def proj(name):
      return nn.DenseGeneral((h, hd), use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name,
                             kernel_init=axes.param(nn.initializers.normal(self.init_std),
                                                    axes.EMBED, axes.HEADS, axes.KV))(x)

    q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")              # [b, t, h, d/h]
    fmap = lambda name: feature_maps.HedgehogFeatureMap(
        features=f, use_bias=self.map_bias, identity_init=self.identity_init, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    phi_q, phi_k = fmap("q_feature_map")(q), fmap("k_feature_map")(k)    # [b, t, h, 2f]
    o, new_cache = feature_maps.normalized_linear_attention(
        phi_q, phi_k, v, eps=self.eps, segment_ids=segment_ids, cache=cache,
        chunk_size=self.chunk_size, impl=self.impl)
    out_std = self.init_std / math.sqrt(2 * self.n_layers)
    y = nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="o_proj",
                        kernel_init=axes.param(nn.initializers.normal(out_std), axes.HEADS,
                                               axes.KV, axes.EMBED))(o)  # [b, t, d]
    return y, new_cache
