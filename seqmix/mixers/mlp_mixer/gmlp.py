"""gMLP (Liu et al., "Pay Attention to MLPs", NeurIPS 2021), causal: the gMLP block with its
spatial gating unit (SGU) restricted to past tokens, as the paper's language models.

    z = gelu(x U)                                   U [D, F]                       [B, T, F]
    z1, z2 = z[..., :F/2], z[..., F/2:]
    z2 = LayerNorm(z2)
    g_t = Σ_{s≤t, same doc} W[pos_t, pos_s] z2_s + b[pos_t]     W [L, L], b [L]    [B, T, F/2]
    y = (z1 ⊙ g) V                                  V [F/2, D]                     [B, T, D]

(paper Fig. 1 pseudo-code, eq. 1-3). W is initialised near zero (U(−ε, ε), ε = 1e-3 / L, as
the authors' choice "near-zero values") and b to ones, so the block starts as a plain MLP
(g ≈ 1). Only the lower triangle of W (s ≤ t) is ever used. L = max_len: sequences and caches
longer than L are refused, positions outside [0, L) give NaN. The block's pre-norm and
residual are the model's, and the block replaces the Transformer MLP: use it with mlp="none".

Decoding keeps every past token's normalised z2 (`common.dense_mixing.PastCache`, growing).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import dense_mixing
from seqmix.mixers.common.norms import LayerNorm
from seqmix.parallel import axes


def _near_zero(max_len: int):
  eps = 1e-3 / max_len
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -eps, eps)


@registry.register(
    "gmlp", paper="Pay Attention to MLPs", year=2021, venue="NeurIPS", family="mlp-mixer",
    op="none (masked [L, L] matmul)", parents=("mlp_mixer",), constant_state=False,
    test_kwargs={"d_ffn": 64, "max_len": 64}, url="https://arxiv.org/abs/2105.08050")
class GMLP(MixerBase):
  """Causal gMLP block.  x [B,T,D] -> y [B,T,D].

  d_ffn: F, width of the channel expansion (even; None: 6 · d_model, the paper's ratio).
  max_len: L, rows and columns of the token-mixing matrix W.
  eps: LayerNorm epsilon of the SGU.
  """
  d_ffn: int | None = None
  max_len: int = 1024
  eps: float = 1e-5

  def _width(self) -> int:
    f = self.d_ffn or 6 * self.d_model
    if f < 2 or f % 2:
      raise ValueError(f"gmlp: d_ffn={self.d_ffn} must be an even number >= 2 (the SGU gates "
                       f"one half of the channels with the other); e.g. d_ffn={max(2, f + f % 2)}.")
    if self.max_len < 1:
      raise ValueError(f"gmlp: max_len={self.max_len} must be >= 1.")
    return f

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    """Growing cache of normalised z2 [B, max_len, F/2] for max_len <= self.max_len tokens."""
    f = self._width()
    dense_mixing.check_max_len("gmlp", "init_cache max_len", max_len, self.max_len)
    return dense_mixing.init_past_cache(batch_size, max_len, (f // 2,), dtype)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], PastCache | None). positions [B,T] index W and b (default:
    the token's place in the stream); segment_ids [B,T]: packed documents."""
    del deterministic
    f = self._width()
    b, t, _ = x.shape
    if cache is None:
      dense_mixing.check_max_len("gmlp", "sequence length T", t, self.max_len)
    l = self.max_len
    w = self.param("spatial_kernel", axes.param(_near_zero(l), axes.NONE, axes.NONE), (l, l),
                   self.param_dtype)
    bias = self.param("spatial_bias", axes.param(nn.initializers.ones, axes.NONE), (l,),
                      self.param_dtype)

    def dense(features, in_ax, out_ax, name):
      return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=axes.param(nn.initializers.lecun_normal(), in_ax, out_ax),
                      bias_init=axes.param(nn.initializers.zeros, out_ax), name=name)

    z = nn.gelu(dense(f, axes.EMBED, axes.MLP, "proj_in")(x.astype(self.dtype)))   # [b, t, f]
    z1, z2 = z[..., : f // 2], z[..., f // 2:]
    z2 = LayerNorm(eps=self.eps, dtype=self.dtype, param_dtype=self.param_dtype,
                   axis_name=axes.MLP, name="sgu_norm")(z2)
    index, positions = dense_mixing.token_index(cache, b, t, positions)
    seg = dense_mixing.segments_or_zeros(segment_ids, b, t)
    z2_all, pos_k, visible = dense_mixing.with_past(cache, z2, index, positions, seg)
    mix = dense_mixing.table_at(w.astype(jnp.float32), positions, pos_k)       # [b, t, s]
    mix = jnp.where(visible, mix, 0.0)
    inside = (positions >= 0) & (positions < l)
    b_t = jnp.where(inside, bias.astype(jnp.float32)[jnp.clip(positions, 0, l - 1)], jnp.nan)
    gate = jnp.einsum("bts,bsc->btc", mix, z2_all.astype(jnp.float32)) + b_t[..., None]
    y = dense(self.d_model, axes.MLP, axes.EMBED, "proj_out")(z1 * gate.astype(self.dtype))
    new_cache = None if cache is None else dense_mixing.write(cache, z2, index, positions, seg)
    return y, new_cache
