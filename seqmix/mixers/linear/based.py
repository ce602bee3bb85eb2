"""Based: Taylor linear attention + sliding-window softmax attention (Arora et al., "Simple
linear attention language models balance the recall-throughput tradeoff", ICML 2024).

    q = x W_q, k = x W_k  [B,T,H,F] (F = feature_dim, 16),   v = x W_v  [B,T,H,D/H]
    φ(x) = [1, x / F^¼, x⊗x / √(2F)]       (φ(q)·φ(k) = 1 + q·k/√F + (q·k)²/2F ≈ exp(q·k/√F))
    y_lin = [Σ_{s<=t} φ(q_t)·φ(k_s) v_s / (Σ_{s<=t} φ(q_t)·φ(k_s) + eps)] W_o
    y_swa = MHA(x; window = W, RoPE)        (softmax over the W most recent tokens)
    y     = y_lin + y_swa

The linear branch is one `linear_attention.gla` call (scale 1, no decay) on the Taylor
features with a ones column appended to v: the last output column is the denominator
(`feature_maps.normalized_linear_attention`). x⊗x is stored compactly (upper triangle), so
K = 1 + F + F(F+1)/2 (153 for F = 16) instead of the reference code's 1 + F + F²; the dot
products are identical.

Composition. In the paper (and the HazyResearch/based training code) the two kinds of token
mixing are separate layers of one stack: Taylor linear-attention layers, sliding-window
attention layers (window 64 to 128) and gated-convolution (BaseConv) layers; zoology's
`Hybrid` likewise picks one mixer per layer index. seqmix's registry has one mixer per block, so
this mixer is the hybrid *layer* the issue asks for: both branches read the same input and
their outputs are summed (each with its own output projection). The layer-interleaved stack
of the paper is the pattern "based,mha" with `mha` configured with a window; BaseConv is not
part of this mixer.

Decoding keeps the linear state `[B, H, K, D/H + 1]` plus the window branch's ring buffer of W
slots (`MHACache`), so the cache has a constant size whatever the stream length.
Initialisation: q/k/v projections N(0, 0.02²), the output projection N(0, 0.02² / 2n_layers)
(GPT-2 style, as the based training code initialises every `out_proj`); the window branch is
`seqmix.mixers.attention.mha.MHA` with its own (lecun-normal) initialisation.
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.attention.mha import MHA, MHACache
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import feature_maps
from seqmix.parallel import axes


class BasedCache(NamedTuple):
  linear: feature_maps.FeatureMapCache  # Σ φ(k)ᵀ [v, 1] and the last segment id
  window: MHACache                      # ring buffer of the last W keys / values


@registry.register(
    "based", paper="Simple linear attention language models balance the recall-throughput "
    "tradeoff", year=2024, venue="ICML", family="linear-attention",
    op="linear_attention.gla + attention.attention", parents=("linear_transformer", "mha"),
    constant_state=True,
    test_kwargs={"num_heads": 2, "feature_dim": 4, "window": 4},
    url="https://arxiv.org/abs/2402.18668", sequence_parallel=True)
class Based(MixerBase):
  """Taylor linear attention plus sliding-window attention, summed.  x [B,T,D] -> y [B,T,D].

  num_heads: H, heads of both branches; values have D/H channels per head.
  feature_dim: F, the projected q/k width per head fed to the Taylor map (paper: 16).
  window: W, keys each token sees in the softmax branch, itself included (paper: 64).
  eps: added to the linear branch's denominator (the reference code's 1e-12; the Taylor
    kernel is >= 1/2, so it only guards degenerate inputs).
  init_std: std of the linear branch's q/k/v projections (GPT-2's 0.02); its output projection
    uses init_std / sqrt(2 n_layers).
  rope_base: RoPE base of the window branch.
  chunk_size, impl: passed to `linear_attention.gla`.
  attn_impl: passed to `attention.attention` (through MHA) for the window branch.
  """
  num_heads: int = 16
  feature_dim: int = 16
  window: int = 64
  eps: float = 1e-12
  init_std: float = 0.02
  rope_base: float = 10000.0
  chunk_size: int = 64
  impl: str = "auto"
  attn_impl: str = "auto"

  def _check(self):
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    if self.feature_dim < 1:
      raise ValueError(f"feature_dim={self.feature_dim} must be >= 1 (the paper uses 16).")
    if self.window < 1:
      raise ValueError(f"window={self.window} must be >= 1 (keys a token sees in the sliding "
                       "window, itself included; the paper uses 64).")

  def _window_attention(self, **kw):
    """The window branch; `parent=None` gives an unbound copy (for `init_cache`)."""
    return MHA(d_model=self.d_model, layer_idx=self.layer_idx, n_layers=self.n_layers,
               dtype=self.dtype, param_dtype=self.param_dtype, num_heads=self.num_heads,
               position="rope", rope_base=self.rope_base, window=self.window,
               impl=self.attn_impl, **kw)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> BasedCache:
    """Linear state (float32) and a ring buffer of min(W, max_len) slots (in `dtype`)."""
    self._check()
    lin = feature_maps.init_feature_map_cache(
        batch_size, self.num_heads, feature_maps.taylor_exp_size(self.feature_dim),
        self.d_model // self.num_heads)
    return BasedCache(lin, self._window_attention(parent=None).init_cache(batch_size, max_len, dtype))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], BasedCache | None).

    positions [B,T]: RoPE positions of the window branch (default arange(T) + tokens cached).
    """
    self._check()
    b, t, d = x.shape
    h, f = self.num_heads, self.feature_dim
    x = x.astype(self.dtype)

    def proj(features, std, name):
      return nn.DenseGeneral((h, features), use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name,
                             kernel_init=axes.param(nn.initializers.normal(std), axes.EMBED,
                                                    axes.HEADS, axes.KV))(x)

    q = proj(f, self.init_std, "q_proj")                                 # [b, t, h, f]
    k = proj(f, self.init_std, "k_proj")                                 # [b, t, h, f]
    v = proj(d // h, self.init_std, "v_proj")                            # [b, t, h, d/h]
    phi_q = feature_maps.taylor_exp(q)                                   # [b, t, h, K]
    phi_k = feature_maps.taylor_exp(k)
    o, lin_cache = feature_maps.normalized_linear_attention(
        phi_q, phi_k, v, eps=self.eps, segment_ids=segment_ids,
        cache=None if cache is None else cache.linear, chunk_size=self.chunk_size,
        impl=self.impl)
    out_std = self.init_std / math.sqrt(2 * self.n_layers)
    y_lin = nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="o_proj",
                            kernel_init=axes.param(nn.initializers.normal(out_std), axes.HEADS,
                                                   axes.KV, axes.EMBED))(o)  # [b, t, d]

    y_swa, win_cache = self._window_attention(name="window_attn")(
        x, segment_ids=segment_ids, positions=positions,
        cache=None if cache is None else cache.window, deterministic=deterministic)
    y = y_lin + y_swa
    return y, None if cache is None else BasedCache(lin_cache, win_cache)

