"""HGRN: Hierarchically Gated Recurrent Neural Network (Qin et al., "Hierarchically Gated Recurrent
Neural Network for Sequence Modeling", NeurIPS 2023), real-valued as fla's `HGRNAttention`.

    f_t = β_l + (1 − β_l) σ(x_t W_f)              forget gate with the layer's lower bound β_l
    i_t = silu(x_t W_i) ⊙ (1 − f_t)               input tied to the forget gate
    h_t = f_t ⊙ h_{t−1} + i_t                     (seqmix.ops.scan.linear_scan)  [B, T, E·D]
    y = W_o (RMSNorm(h_t) ⊙ scale ⊙ silu(x_t W_g))   output gate (fla's FusedRMSNormGated)

Lower bound (deviation, documented): HGRN learns one model-level table Γ [L, E·D] and gives layer
l the bound β_l = cumsum(softmax(Γ, over layers))_l − softmax(Γ)_0, which rises with depth (0 for
the first layer). A mixer cannot own a parameter shared across layers, so β_l is fixed to that
table's value at its zero initialisation, β_l = layer_idx / n_layers (as `hgrn2`). 1 − f_t is
computed as (1 − β_l) σ(−x W_f), without cancellation.

The paper's HGRN1 uses a complex recurrence (a learned phase); this is the real form of fla's
layer (fla's default: no short conv). Init as fla: projections U(±√(6·2⁻⁵/(fan_in+fan_out)))
(`gla.FLA_INIT`), norm scale 1.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import segments
from seqmix.mixers.common.norms import GatedRMSNorm
from seqmix.mixers.linear.gla import FLA_INIT
from seqmix.mixers.linear.hgrn2 import forget_lower_bound
from seqmix.parallel import axes
from seqmix.parallel import dispatch


class HGRNCache(NamedTuple):
  state: jax.Array  # [B, E·D] float32
  seg: jax.Array    # [B] int32 segment id of the last token seen (-1 before the first)


@registry.register(
    "hgrn", paper="Hierarchically Gated Recurrent Neural Network for Sequence Modeling",
    year=2023, venue="NeurIPS", family="linear-rnn", op="scan.linear_scan", parents=("lru",),
    constant_state=True, test_kwargs={}, url="https://arxiv.org/abs/2311.04823",
    sequence_parallel=True)
class HGRN(MixerBase):
  """HGRN token mixer.  x [B, T, D] -> y [B, T, D].

  expand_ratio: E, the recurrence width E·D (1).
  norm_eps: eps of the gated output RMSNorm (1e-5).
  impl, chunk_size: passed to `seqmix.ops.scan.linear_scan`.
  The forget-gate lower bound is layer_idx / n_layers (see the module docstring).
  """
  expand_ratio: int = 1
  norm_eps: float = 1e-5
  impl: str = "auto"
  chunk_size: int = 64

  def _width(self):
    if not isinstance(self.expand_ratio, int) or self.expand_ratio < 1:
      raise ValueError(f"hgrn: expand_ratio={self.expand_ratio!r} must be an int >= 1 (fla: 1).")
    return self.expand_ratio * self.d_model

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> HGRNCache:
    del max_len, dtype  # constant-size float32 state
    return HGRNCache(jnp.zeros((batch_size, self._width()), jnp.float32),
                     jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], HGRNCache | None)."""
    del positions, deterministic
    w = self._width()
    lower = forget_lower_bound(self.layer_idx, self.n_layers)
    b = x.shape[0]
    dense = lambda features, in_axis, out_axis, name: nn.Dense(
        features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=axes.param(FLA_INIT, in_axis, out_axis))
    x = x.astype(self.dtype)
    i = dense(w, axes.EMBED, axes.HEADS, "i_proj")(x).astype(jnp.float32)
    f = dense(w, axes.EMBED, axes.HEADS, "f_proj")(x).astype(jnp.float32)
    g = dense(w, axes.EMBED, axes.HEADS, "g_proj")(x)
    forget = lower + (1.0 - lower) * jax.nn.sigmoid(f)                  # f_t  [b, t, w]
    inp = jax.nn.silu(i) * ((1.0 - lower) * jax.nn.sigmoid(-f))         # silu(i) (1 − f_t)
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    forget = segments.reset_decay(forget, starts)
    h, state = dispatch.linear_scan(forget, inp.astype(self.dtype),
                                    initial_state=None if cache is None else cache.state,
                                    chunk_size=self.chunk_size, impl=self.impl)
    o = GatedRMSNorm(eps=self.norm_eps, norm_before_gate=True, axis_name=axes.HEADS,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="g_norm")(h, g)
    y = dense(self.d_model, axes.HEADS, axes.EMBED, "o_proj")(o)
    new_cache = None if cache is None else HGRNCache(state,
                                                     segments.last_segment_id(segment_ids, b))
    return y, new_cache
