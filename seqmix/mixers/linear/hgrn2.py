"""HGRN2: gated linear RNN with outer-product state expansion (Qin et al., "HGRN2: Gated Linear
RNNs with State Expansion", COLM 2024).

    f_t = β_l + (1 − β_l) σ(x_t W_f)           forget gate with the layer's lower bound β_l
    i_t = x_t W_i,  o_t = swish(x_t W_q)         input and output (query) paths
    S_t = diag(f_t) S_{t−1} + (1 − f_t)ᵀ i_t    k = 1 − f: the input gate is tied to the forget gate
    y_t = W_o RMSNorm(K^-1/2 · o_t S_t)         (seqmix.ops.linear_attention.gla, per-key gate)

Per head, the state is `[E, D/H]` with E = expand_ratio (the forget/query width per head) and
H = D / E heads, as in fla's `HGRN2Attention`.

Lower bound (deviation, documented): HGRN/HGRN2 learn ONE model-level table Γ [L, E·H] and give
layer l the bound β_l = cumsum(softmax(Γ, over layers))_l − softmax(Γ)_0, which rises with depth
(0 for the first layer). A mixer here cannot own a parameter shared across layers (models hold
nothing mixer-specific), so β_l is fixed to the value that table takes at its zero
initialisation: β_l = layer_idx / n_layers. The log gate is computed as
log(β_l + (1 − β_l) σ(f)) and k = (1 − β_l) σ(−f), which is 1 − f_t without cancellation.
With this fixed bound and the zero-mean init, the decay starts at ≈ 0.5 in layer 0 and ≈ 0.75
in layer 1 of 2 (half-lives of 1 and 2.4 tokens): long memory must be learned through f alone.

Short convolution (option, fla's `use_short_conv`, default off as in fla): the q, f, i
projections each pass a causal depthwise convolution of `conv_size` taps with no activation
(fla: `ShortConvolution(..., activation=None)`) before swish / the gate.
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.norms import RMSNorm
from seqmix.mixers.common.short_conv import ShortConv, ShortConvCache
from seqmix.mixers.linear.gla import FLA_INIT
from seqmix.parallel import axes
from seqmix.parallel import dispatch


class HGRN2Cache(NamedTuple):
  state: jax.Array  # [B, H, E, D/H] float32
  seg: jax.Array    # [B] int32 segment id of the last token seen
  conv: Optional[ShortConvCache] = None  # use_short_conv: the last L−1 inputs over [q, f, i]


def forget_lower_bound(layer_idx: int, n_layers: int) -> float:
  """β_l = layer_idx / n_layers: HGRN's cumsum-softmax lower bound at its zero initialisation."""
  if not 0 <= layer_idx < max(n_layers, 1):
    raise ValueError(f"hgrn2: layer_idx={layer_idx} must be in [0, n_layers={n_layers}); the "
                     f"forget-gate lower bound rises with depth as layer_idx / n_layers.")
  return layer_idx / n_layers


@registry.register(
    "hgrn2", paper="HGRN2: Gated Linear RNNs with State Expansion", year=2024, venue="COLM",
    family="linear-rnn", op="linear_attention.gla", parents=("hgrn", "gla"),
    constant_state=True, test_kwargs={"expand_ratio": 16}, sequence_parallel=True)
class HGRN2(MixerBase):
  """HGRN2 token mixer.  x [B, T, D] -> y [B, T, D].

  expand_ratio: E, the state expansion (forget/query width per head); H = D / E heads (128).
  norm_eps: eps of the output RMSNorm over D.
  use_short_conv: causal depthwise conv (no activation) on the q, f, i projections (False, as
    fla). conv_size: its taps (4). conv_bias: a bias in it (False, as fla).
  chunk_size, impl: passed to `linear_attention.gla`.
  The forget-gate lower bound is layer_idx / n_layers (see the module docstring).
  """
  expand_ratio: int = 128
  norm_eps: float = 1e-5
  use_short_conv: bool = False
  conv_size: int = 4
  conv_bias: bool = False
  chunk_size: int = 64
  impl: str = "auto"

  def _heads(self):
    check_divisible("d_model", self.d_model, self.expand_ratio, "expand_ratio")
    if self.use_short_conv and self.conv_size < 1:
      raise ValueError(f"hgrn2: conv_size={self.conv_size} must be >= 1 with "
                       f"use_short_conv=True (fla uses 4).")
    return self.d_model // self.expand_ratio

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> HGRN2Cache:
    del max_len, dtype  # constant-size float32 state
    h = self._heads()
    conv = None
    if self.use_short_conv:
      l1 = self.conv_size - 1
      conv = ShortConvCache(jnp.zeros((batch_size, l1, 3 * self.d_model), self.dtype),
                            jnp.full((batch_size, l1), -1, jnp.int32))
    return HGRN2Cache(jnp.zeros((batch_size, h, self.expand_ratio, self.d_model // h),
                                jnp.float32), jnp.full((batch_size,), -1, jnp.int32), conv)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], HGRN2Cache | None)."""
    del positions, deterministic
    h = self._heads()
    lower = forget_lower_bound(self.layer_idx, self.n_layers)
    b, t, d = x.shape
    dense = lambda in_axis, out_axis, name: nn.Dense(
        d, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=axes.param(FLA_INIT, in_axis, out_axis))
    x = x.astype(self.dtype)
    q = dense(axes.EMBED, axes.HEADS, "q_proj")(x)
    f = dense(axes.EMBED, axes.HEADS, "f_proj")(x)
    i = dense(axes.EMBED, axes.HEADS, "i_proj")(x)
    conv_cache = None
    if self.use_short_conv:  # one depthwise conv over [q; f; i] = three separate ones
      qfi, conv_cache = ShortConv(
          3 * d, self.conv_size, use_bias=self.conv_bias, activation=None, axis=axes.HEADS,
          dtype=self.dtype, param_dtype=self.param_dtype, name="conv1d")(
              jnp.concatenate([q, f, i], axis=-1), segment_ids=segment_ids,
              cache=None if cache is None else cache.conv)
      q, f, i = jnp.split(qfi, 3, axis=-1)
    q = jax.nn.silu(q)
    f = f.astype(jnp.float32)
    if lower == 0.0:
      log_f = jax.nn.log_sigmoid(f)
    else:
      log_f = jnp.log(lower + (1.0 - lower) * jax.nn.sigmoid(f))
    k = ((1.0 - lower) * jax.nn.sigmoid(-f)).astype(self.dtype)          # 1 − f_t
    q, k, log_f = (a.reshape(b, t, h, self.expand_ratio) for a in (q, k, log_f))  # [b, t, h, e]
    i = i.reshape(b, t, h, d // h)                                       # [b, t, h, d/h]
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    log_f = segments.reset_log_gate(log_f, starts)
    o, state = dispatch.gla(q, k, i, log_f,
                            initial_state=None if cache is None else cache.state,
                            chunk_size=self.chunk_size, impl=self.impl)
    o = RMSNorm(eps=self.norm_eps, axis_name=axes.HEADS, dtype=self.dtype,
                param_dtype=self.param_dtype, name="g_norm")(o.reshape(b, t, d))
    y = dense(axes.HEADS, axes.EMBED, "o_proj")(o)
    new_cache = None if cache is None else HGRN2Cache(
        state, segments.last_segment_id(segment_ids, b), conv_cache)
    return y, new_cache
