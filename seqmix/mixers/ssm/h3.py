"""H3: Hungry Hungry Hippos (Fu et al., "Hungry Hungry Hippos: Towards Language Modeling with
State Space Models", ICLR 2023).

    q, k, v = x W_q, x W_k, x W_v                        [B, T, D], biases
    k̃ = SSM_shift(k) + D_k ⊙ k                           per channel: A = shift, B = e_1, so the
                                                          kernel is C [N] (an N-tap causal conv)
    per head h (H = D / d_h heads of d_h channels):
      S_t = SSM_diag,h(k̃_t v_tᵀ) + D_h k̃_t v_tᵀ           [d_h, d_h]: one diagonal SSM per head
                                                          (S4D-Lin, ZOH) over the d_h² products
      o_t = q_tᵀ S_t                                      [d_h]
    y = o W_o                                             [B, T, D], bias

With d_h = 1 this is the paper's Q ⊙ SSM_diag(SSM_shift(K) ⊙ V); d_h > 1 is its multi-head
form (the outer product k vᵀ per head, as linear attention, with the SSM kernel in place of the
sum over the past). Parallel form: the shift SSM is `ShortConv` (N taps, no bias, no
activation); the diagonal SSM's kernel [T, H] convolves the [B, T, H·d_h²] products through
`causal_conv`. Decoding and packed documents: the shift SSM's cache holds the last N-1 k's; the
diagonal SSM runs as the recurrence (complex `linear_scan`, state [B, H, N/2, d_h²]), reset at
document starts (ShortConv masks its taps across documents).

Init as the paper's code: Δ ~ LogUniform[dt_min, dt_max] per head, A = S4D-Lin, B = 1, C ~ CN(0,1),
D_k, D ~ N(0, 1). Deviation: the shift SSM's C uses `ShortConv`'s init U(±1/√N) (the paper's
code draws N(0, 1)); the shared short conv piece has no init option, and the scale is learned.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common.short_conv import ShortConv, ShortConvCache
from seqmix.mixers.ssm import _common
from seqmix.parallel import axes


class H3Cache(NamedTuple):
  shift: ShortConvCache  # the shift SSM's last N-1 inputs k (and their segment ids)
  state: jax.Array       # [B, H, N/2, d_h²] complex64 diagonal SSM state per head
  seg: jax.Array         # [B] int32 segment id of the last token seen (-1 before the first)


@registry.register(
    "h3", paper="Hungry Hungry Hippos: Towards Language Modeling with State Space Models",
    year=2023, venue="ICLR", family="ssm",
    op="conv.causal_conv (shift SSM) + ssm_kernels.s4d_kernel + conv.causal_conv; "
       "scan.linear_scan (decode)",
    parents=("s4d", "linear_transformer"), constant_state=True,
    test_kwargs={"d_state": 8, "head_dim": 8})
class H3(MixerBase):
  """H3 layer.  x [B, T, D] -> y [B, T, D].

  d_state: N, the state size of both SSMs (shift SSM: N taps; diagonal SSM: N/2 conjugate pairs,
    so even).
  head_dim: d_h, channels per head (paper's LMs: 1); H = d_model / d_h heads.
  dt_min, dt_max: range of the log-uniform init of the diagonal SSM's step Δ (one per head).
  conv_impl: `causal_conv` impl of both convolutions ("auto" | "reference" | "fft").
  scan_impl, chunk_size: `linear_scan` impl and chunk size of the recurrence.
  """
  d_state: int = 64
  head_dim: int = 1
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  conv_impl: str = "auto"
  scan_impl: str = "auto"
  chunk_size: int = 64

  def _dims(self):
    _common.check_even("d_state", self.d_state, "the diagonal SSM's states come in "
                       "complex-conjugate pairs")
    _common.check_at_least("head_dim", self.head_dim)
    check_divisible("d_model", self.d_model, self.head_dim, "head_dim")
    return self.d_model // self.head_dim, self.head_dim

  def _shift(self, **kw):
    return ShortConv(self.d_model, kernel_size=self.d_state, use_bias=False, activation=None,
                     impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype, **kw)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> H3Cache:
    del max_len
    h, dh = self._dims()
    return H3Cache(self._shift(parent=None).init_cache(batch_size, dtype),
                   jnp.zeros((batch_size, h, self.d_state // 2, dh * dh), jnp.complex64),
                   jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], H3Cache | None)."""
    del positions, deterministic
    h, dh = self._dims()
    b, t, d = x.shape

    def dense(name):
      return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                      kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED,
                                             axes.HEADS),
                      bias_init=axes.param(nn.initializers.zeros, axes.HEADS))

    x = x.astype(self.dtype)
    q, k, v = dense("q_proj")(x), dense("k_proj")(x), dense("v_proj")(x)        # [b, t, d]
    d_k = self.param("shift_d", axes.param(nn.initializers.normal(1.0), axes.HEADS), (d,),
                     self.param_dtype)
    k_shift, shift_cache = self._shift(name="shift_ssm")(k, segment_ids=segment_ids,
                                         cache=None if cache is None else cache.shift)
    k = k_shift.astype(jnp.float32) + d_k.astype(jnp.float32) * k.astype(jnp.float32)
    kv = (k.reshape(b, t, h, dh, 1)
          * v.astype(jnp.float32).reshape(b, t, h, 1, dh))                     # [b, t, h, d1, d2]
    starts, last_seg = _common.starts_and_seg(segment_ids, cache, b)
    ssm = _common.DiagSSM(h, self.d_state, ssm_init="lin", disc="zoh", learn_b=True,
                          dt_min=self.dt_min, dt_max=self.dt_max, conv_impl=self.conv_impl,
                          scan_impl=self.scan_impl, chunk_size=self.chunk_size,
                          axis=axes.HEADS, param_dtype=self.param_dtype, name="diag_ssm")
    s, state = ssm(kv.reshape(b, t, h, dh * dh).astype(self.dtype), starts=starts,
                   state=None if cache is None else cache.state,
                   recurrent=cache is not None or segment_ids is not None)     # [b, t, h, d1·d2]
    s = s.reshape(b, t, h, dh, dh)                                             # [b, t, h, d1, d2]
    o = jnp.einsum("bthi,bthij->bthj", q.astype(jnp.float32).reshape(b, t, h, dh), s)
    y = nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj",
                 kernel_init=axes.param(nn.initializers.lecun_normal(), axes.HEADS, axes.EMBED),
                 bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(
                     o.reshape(b, t, d).astype(self.dtype))                    # [b, t, h·d2]
    new_cache = None if cache is None else H3Cache(shift_cache, state, last_seg)
    return y, new_cache
