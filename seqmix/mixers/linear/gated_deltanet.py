"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta
Rule", ICLR 2025), through `seqmix.ops.delta_rule` with a Mamba2-style scalar gate.

    q, k, v = silu(ShortConv(x W_q)), silu(ShortConv(x W_k)), silu(ShortConv(x W_v))
    q, k = q / ‖q‖₂, k / ‖k‖₂   (per head);   β_t = sigmoid(x_t W_β)          [B, T, H]
    g_t = −exp(A_log) · softplus(x_t W_a + dt_bias)                           [B, T, H]
    S_t = exp(g_t) S_{t−1};  S_t += k_tᵀ (β_t (v_t − k_t S_t));  o_t = K^-1/2 · q_t S_t
    y = W_o [RMSNorm_head(o) ⊙ silu(x W_g)]                       (gated RMSNorm, per head)

Defaults and initialisation follow fla's `GatedDeltaNet` layer (the authors' code): head_dim 256,
6 heads, expand_v 2, short convs of 4 taps without bias, A ~ U(0, 16), softplus(dt_bias) ~
LogUniform(1e-3, 1e-1) floored at 1e-4 (Mamba2's, from `seqmix.mixers.linear.mamba2`),
projections N(0, 0.02²), W_o as DeltaNet's.

Packed documents: g = −inf at a document's first token; the short conv masks across documents.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import segments
from seqmix.mixers.common.norms import GatedRMSNorm
from seqmix.mixers.linear.deltanet import (FLA_LINEAR_INIT, DeltaNetCache, delta_conv_cache,
                                           delta_inputs, out_proj_init)
from seqmix.mixers.linear.mamba2 import a_log_init, dt_bias_init
from seqmix.parallel import axes
from seqmix.parallel import dispatch


# The same decoding state as DeltaNet's: (short-conv cache, [B, H, K, V] fast weights, last
# segment id).
GatedDeltaNetCache = DeltaNetCache


@registry.register(
    "gated_deltanet", paper="Gated Delta Networks: Improving Mamba2 with Delta Rule", year=2025,
    venue="ICLR", family="linear-attention", op="delta_rule.delta_rule + conv.causal_conv",
    parents=("deltanet", "mamba2", "gla"), constant_state=True,
    test_kwargs={"num_heads": 2, "head_dim": 16}, sequence_parallel=True)
class GatedDeltaNet(MixerBase):
  """Gated DeltaNet layer.  x [B, T, D] -> y [B, T, D].

  num_heads: H (6). head_dim: K per head (256); the value head dim is expand_v·K.
  expand_v: value head dim over the key head dim (2).
  conv_size: taps of the short convs on q, k, v (4). conv_bias: their bias (False).
  dt_min, dt_max, dt_init_floor: softplus(dt_bias) ~ LogUniform(dt_min, dt_max) at init,
    floored at dt_init_floor (1e-3, 1e-1, 1e-4).
  A_init_range: A = exp(A_log) ~ U(low, high) at init ((0, 16)).
  norm_eps: eps of the gated per-head RMSNorm (1e-5).
  chunk_size, impl: passed to `delta_rule.delta_rule`; conv_impl to `conv.causal_conv`.
  """
  num_heads: int = 6
  head_dim: int = 256
  expand_v: float = 2.0
  conv_size: int = 4
  conv_bias: bool = False
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  dt_init_floor: float = 1e-4
  A_init_range: tuple = (0.0, 16.0)
  norm_eps: float = 1e-5
  chunk_size: int = 64
  impl: str = "auto"
  conv_impl: str = "auto"

  def _dims(self):
    head_v = int(self.head_dim * self.expand_v)
    if self.num_heads < 1 or self.head_dim < 1 or head_v < 1:
      raise ValueError(f"gated_deltanet: num_heads={self.num_heads}, head_dim={self.head_dim} "
                       f"and head_dim·expand_v={head_v} must be positive.")
    if head_v != self.head_dim * self.expand_v:
      raise ValueError(f"gated_deltanet: head_dim·expand_v = {self.head_dim * self.expand_v} "
                       f"must be an integer; change expand_v or head_dim.")
    if not 0 < self.dt_min <= self.dt_max:
      raise ValueError(f"gated_deltanet: need 0 < dt_min <= dt_max; got dt_min={self.dt_min}, "
                       f"dt_max={self.dt_max} (defaults 1e-3, 1e-1).")
    if not 0 <= self.A_init_range[0] < self.A_init_range[1]:
      raise ValueError(f"gated_deltanet: A_init_range={self.A_init_range} must be (low, high) "
                       f"with 0 <= low < high (default (0, 16)).")
    return self.num_heads * self.head_dim, self.num_heads * head_v

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> GatedDeltaNetCache:
    del max_len
    key_dim, value_dim = self._dims()
    h = self.num_heads
    conv = delta_conv_cache(batch_size, self.conv_size, key_dim, value_dim, dtype)
    return GatedDeltaNetCache(conv, jnp.zeros((batch_size, h, self.head_dim, value_dim // h),
                                              jnp.float32), jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], GatedDeltaNetCache | None)."""
    del positions, deterministic
    key_dim, value_dim = self._dims()
    b, t, _ = x.shape
    h = self.num_heads
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    dense = lambda f, name: nn.Dense(
        f, name=name, kernel_init=axes.param(FLA_LINEAR_INIT, axes.EMBED, axes.HEADS), **kw)
    q, k, v, beta, conv_cache = delta_inputs(
        x, key_dim, value_dim, h, conv_size=self.conv_size, conv_bias=self.conv_bias,
        conv_impl=self.conv_impl, segment_ids=segment_ids,
        conv_cache=None if cache is None else cache.conv, dtype=self.dtype,
        param_dtype=self.param_dtype)

    a_log = self.param("A_log", axes.param(a_log_init(*self.A_init_range), axes.HEADS), (h,),
                       self.param_dtype)
    dt_bias = self.param("dt_bias", axes.param(
        dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor), axes.HEADS), (h,),
        self.param_dtype)
    dt = jax.nn.softplus(dense(h, "a_proj")(x).astype(jnp.float32)
                         + dt_bias.astype(jnp.float32))                  # [b, t, h]
    g = -jnp.exp(a_log.astype(jnp.float32)) * dt
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    g = segments.reset_log_gate(g, starts)
    o, state = dispatch.delta_rule(q, k, v, beta, g,
                                   initial_state=None if cache is None else cache.state,
                                   chunk_size=self.chunk_size, impl=self.impl)
    gate = dense(value_dim, "g_proj")(x).reshape(o.shape)                # [b, t, h, v]
    o = GatedRMSNorm(eps=self.norm_eps, norm_before_gate=True, axis_name=axes.KV,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="o_norm")(o, gate)
    y = nn.Dense(self.d_model, name="o_proj", **kw, kernel_init=axes.param(
        out_proj_init(self.n_layers), axes.HEADS, axes.EMBED))(o.reshape(b, t, value_dim))
    new_cache = None if cache is None else GatedDeltaNetCache(
        conv_cache, state, segments.last_segment_id(segment_ids, b))
    return y, new_cache
