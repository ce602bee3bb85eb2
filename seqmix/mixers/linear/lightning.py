"""TransNormerLLM's lightning attention (Qin et al., "TransNormerLLM: A Faster and Better Large
Language Model with Improved TransNormer", arXiv 2023; Lightning Attention-2, 2024).

    [q, k, v, u] = x W_qkvu;  q, k = swish(q), swish(k)
    S_t = λ_h S_{t−1} + k_tᵀ v_t,  o_t = q_t S_t       (seqmix.ops.linear_attention.gla, g [H], scale 1)
    y = W_o (SRMSNorm(o) ⊙ u)                          SRMSNorm: x / rms(x), no scale

Decay by head and depth, as the released TransNormerLLM / Lightning Attention code:
    λ_{h,l} = exp(−s_h · (1 − l/(L−1) + 1e-5))      (L = 1: exp(−s_h (1 + 1e-5)))
with s_h the ALiBi slopes (2^(−8(h+1)/H) for H a power of two; ALiBi's interleaving otherwise):
the first layer decays fastest, the last layer keeps almost everything (λ ≈ exp(−1e-5 s_h)).
Not included: TransNormerLLM's LRPE (relative positional rotation on the first layer) and its
SGLU channel mixer (the block's MLP is the model's).
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.norms import RMSNorm
from seqmix.parallel import axes
from seqmix.parallel import dispatch


class LightningCache(NamedTuple):
  state: jax.Array  # [B, H, K, K] float32
  seg: jax.Array    # [B] int32 segment id of the last token seen


def alibi_slopes(n: int) -> np.ndarray:
  """ALiBi's head slopes (Press et al.): geometric 2^(−8/n)^(h+1), interleaved for n not 2^k."""
  def pow2(m):
    start = 2.0 ** (-8.0 / m)
    return [start ** (i + 1) for i in range(m)]
  if math.log2(n).is_integer():
    return np.asarray(pow2(n), np.float64)
  closest = 2 ** math.floor(math.log2(n))
  return np.asarray(pow2(closest) + list(alibi_slopes(2 * closest)[0::2][:n - closest]),
                    np.float64)


def lightning_log_decays(num_heads: int, layer_idx: int, n_layers: int):
  """[H] float32 log λ_{h,l} = −s_h (1 − l/(L−1) + 1e-5) (see the module docstring)."""
  if not 0 <= layer_idx < max(n_layers, 1):
    raise ValueError(f"lightning: layer_idx={layer_idx} must be in [0, n_layers={n_layers}); "
                     f"the decay depends on depth.")
  depth = 1.0 if n_layers <= 1 else 1.0 - layer_idx / (n_layers - 1)
  return jnp.asarray(-alibi_slopes(num_heads) * (depth + 1e-5), jnp.float32)


@registry.register(
    "lightning", paper="TransNormerLLM: A Faster and Better Large Language Model with Improved "
    "TransNormer", year=2023, venue="arXiv", family="linear-attention",
    op="linear_attention.gla", parents=("transnormer", "retnet"), constant_state=True,
    test_kwargs={"num_heads": 4}, sequence_parallel=True)
class Lightning(MixerBase):
  """Lightning attention (TransNormerLLM's token mixer).  x [B, T, D] -> y [B, T, D].

  num_heads: H; q, k, v, u have D/H channels per head.
  use_bias: biases on the projections (TransNormerLLM: none).
  norm_eps: eps of the SRMSNorm.
  init_std: std of the normal initialisation of the projections (TransNormerLLM: 0.02).
  chunk_size, impl: passed to `linear_attention.gla`.
  The per-head decay depends on layer_idx and n_layers (see the module docstring).
  """
  num_heads: int = 8
  use_bias: bool = False
  norm_eps: float = 1e-6
  init_std: float = 0.02
  chunk_size: int = 64
  impl: str = "auto"

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> LightningCache:
    del max_len, dtype  # constant-size float32 state
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    hd = self.d_model // self.num_heads
    return LightningCache(jnp.zeros((batch_size, self.num_heads, hd, hd), jnp.float32),
                          jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], LightningCache | None)."""
    del positions, deterministic
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    log_lambda = lightning_log_decays(self.num_heads, self.layer_idx, self.n_layers)  # [h]
    b, t, d = x.shape
    h = self.num_heads
    init = nn.initializers.normal(self.init_std)
    dense = lambda f, in_axis, out_axis, name: nn.Dense(
        f, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=axes.param(init, in_axis, out_axis),
        bias_init=axes.param(nn.initializers.zeros, out_axis))
    x = x.astype(self.dtype)
    q, k, v, u = jnp.split(dense(4 * d, axes.EMBED, axes.HEADS, "qkvu_proj")(x), 4, axis=-1)
    q, k, v = (a.reshape(b, t, h, d // h) for a in (jax.nn.silu(q), jax.nn.silu(k), v))
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    g = (log_lambda if starts is None else
         segments.reset_log_gate(jnp.broadcast_to(log_lambda, (b, t, h)), starts))
    o, state = dispatch.gla(q, k, v, g, scale=1.0,
                            initial_state=None if cache is None else cache.state,
                            chunk_size=self.chunk_size, impl=self.impl)
    o = RMSNorm(eps=self.norm_eps, use_scale=False, dtype=self.dtype, name="norm")(
        o.reshape(b, t, d))
    y = dense(d, axes.HEADS, axes.EMBED, "out_proj")(o * u)
    new_cache = None if cache is None else LightningCache(
        state, segments.last_segment_id(segment_ids, b))
    return y, new_cache
