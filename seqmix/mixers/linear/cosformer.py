"""cosFormer: ReLU linear attention with a cos re-weighting of distances (Qin et al.,
"cosFormer: Rethinking Softmax in Attention", ICLR 2022), causal form.

    q = relu(x W_q), k = relu(x W_k), v = x W_v  [B,T,H,D/H]
    y_i = [Σ_{j<=i} q_i·k_j cos(π(i − j)/2M) v_j / (Σ_{j<=i} q_i·k_j cos(π(i − j)/2M) + eps)] W_o

cos(π(i − j)/2M) = cos(πi/2M) cos(πj/2M) + sin(πi/2M) sin(πj/2M), so with
φ(x_i) = [x_i cos(πi/2M), x_i sin(πi/2M)] (2·D/H features) the sum is a plain linear attention:
one `linear_attention.gla` call (scale 1, no decay) with a ones column appended to v gives the
numerator and the denominator (`feature_maps.normalized_linear_attention`).

Positions and horizon. i and j are absolute positions: the `positions` argument (packed
documents pass positions restarting at 0 in each), default arange(T) + tokens already cached.
The paper's non-causal form sets M to the sequence length; a causal model cannot know it, so M
is the fixed horizon `max_len` (the longest context the model is meant for). The weight stays
in (0, 1] while i − j < M; beyond it the cosine turns negative, so keep positions below max_len.
Projections: q/k/v/o with biases, initialised as PyTorch's `nn.Linear` default that the official
code relies on (kernel U(±1/√fan_in)); biases start at zero.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import feature_maps
from seqmix.parallel import axes


class CosformerCache(NamedTuple):
  linear: feature_maps.FeatureMapCache  # Σ φ(k)ᵀ [v, 1] and the last segment id
  length: jax.Array                     # [B] int32 tokens seen (the default next position)


@registry.register(
    "cosformer", paper="cosFormer: Rethinking Softmax in Attention", year=2022, venue="ICLR",
    family="linear-attention", op="linear_attention.gla", parents=("linear_transformer",),
    constant_state=True, test_kwargs={"num_heads": 2, "max_len": 64},
    needs_positions=True,
    url="https://arxiv.org/abs/2202.08791", sequence_parallel=True)
class CosFormer(MixerBase):
  """Causal cosFormer attention.  x [B,T,D] -> y [B,T,D].

  num_heads: H; q, k, v have D/H channels per head.
  max_len: M, the fixed horizon of the cos re-weighting (positions should stay below it).
  eps: added to the denominator (the official code's 1e-6).
  use_bias: biases on the q/k/v/output projections (the official code has them).
  chunk_size, impl: passed to `linear_attention.gla`.
  """
  num_heads: int = 8
  max_len: int = 2048
  eps: float = 1e-6
  use_bias: bool = True
  chunk_size: int = 64
  impl: str = "auto"

  def _dims(self):
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    if self.max_len < 1:
      raise ValueError(f"max_len={self.max_len} must be >= 1: it is the horizon M of the cos "
                       "re-weighting (set it to the longest context, e.g. the training length).")
    return self.num_heads, self.d_model // self.num_heads

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> CosformerCache:
    del max_len, dtype  # constant-size float32 state
    h, hd = self._dims()
    return CosformerCache(feature_maps.init_feature_map_cache(batch_size, h, 2 * hd, hd),
                          jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], CosformerCache | None).

    positions [B,T]: absolute positions i of the re-weighting (default arange(T) + cache length).
    """
    del deterministic
    h, hd = self._dims()
    b, t, d = x.shape
    x = x.astype(self.dtype)

    # PyTorch nn.Linear's default kaiming_uniform(a=√5) is U(±1/√fan_in): variance 1/(3 fan_in).
    # DenseGeneral hands the initialiser the flattened [fan_in, fan_out] kernel.
    torch_linear = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

    def proj(name):
      return nn.DenseGeneral((h, hd), use_bias=self.use_bias, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name,
                             kernel_init=axes.param(torch_linear, axes.EMBED, axes.HEADS,
                                                    axes.KV),
                             bias_init=axes.param(nn.initializers.zeros, axes.HEADS, axes.KV))(x)

    q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")              # [b, t, h, d/h]
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
    if positions is None:
      positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]   # [b, t]
    phi_q = feature_maps.cos_reweight(q, positions, self.max_len)         # [b, t, h, 2d/h]
    phi_k = feature_maps.cos_reweight(k, positions, self.max_len)
    o, lin_cache = feature_maps.normalized_linear_attention(
        phi_q, phi_k, v, eps=self.eps, segment_ids=segment_ids,
        cache=None if cache is None else cache.linear, chunk_size=self.chunk_size,
        impl=self.impl)
    y = nn.DenseGeneral(d, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="o_proj",
                        kernel_init=axes.param(torch_linear, axes.HEADS, axes.KV, axes.EMBED),
                        bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(o)  # [b, t, d]
    return y, None if cache is None else CosformerCache(lin_cache, start + t)
