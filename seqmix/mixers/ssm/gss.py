"""GSS: gated state space layer (Mehta et al., "Long Range Language Modeling via Gated State
Spaces", ICLR 2023).

The paper's pseudocode (E = d_model, F = expand·E, H = d_ssm; the pre-norm and the residual
belong to the model's block):

    v = GELU(x W_v)        [B, T, F]   the gate
    u = GELU(x W_u)        [B, T, H]   the SSM input, a reduced width (paper: E/4)
    y = DSS(u)             [B, T, H]   DSS-exp over H channels (`dss.dss_ssm`), with D skip
    uc = y W_c             [B, T, F]
    o = (uc ⊙ v) W_o       [B, T, E]

Paper dims: E = 1024, F = 4096 (expand 4), H = 256 (d_ssm = E/4), N = 512 states per channel.
The SSM is the DSS-exp kernel of `seqmix.mixers.ssm.dss` (conjugate pairs, skew-HiPPO init,
learned Δ); decoding and packed documents run its recurrence (complex `linear_scan`).

Deviation to note: the GSS paper describes a simplified DSS inside GSS (Δ not learned, Λ
initialised randomly); this implementation keeps DSS-exp's own initialisation (skew-HiPPO Λ,
log-uniform Δ), which we could not check against the paper's text here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.ssm import _common
from seqmix.mixers.ssm._common import DiagSSMCache
from seqmix.mixers.ssm.dss import dss_ssm
from seqmix.parallel import axes


@registry.register(
    "gss", paper="Long Range Language Modeling via Gated State Spaces",
    year=2023, venue="ICLR", family="ssm",
    op="ssm_kernels.s4d_kernel + conv.causal_conv; scan.linear_scan (decode)",
    parents=("dss",), constant_state=True,
    test_kwargs={"d_state": 8, "d_ssm": 16, "expand": 2})
class GSS(MixerBase):
  """Gated State Space layer.  x [B, T, D] -> y [B, T, D].

  expand: F = expand · d_model, width of the GELU gate (paper: 4).
  d_ssm: H, width of the SSM (paper: 256 = d_model/4); None means d_model // 4.
  d_state: N, states per SSM channel (even: N/2 conjugate pairs; paper: 512).
  use_bias: biases on the four dense projections.
  dt_min, dt_max: range of the log-uniform init of the DSS step Δ.
  conv_impl: `causal_conv` impl of the parallel form ("auto" | "reference" | "fft").
  scan_impl, chunk_size: `linear_scan` impl and chunk size of the recurrence.
  """
  expand: int = 4
  d_ssm: int | None = None
  d_state: int = 512
  use_bias: bool = True
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  conv_impl: str = "auto"
  scan_impl: str = "auto"
  chunk_size: int = 64

  def _dims(self):
    _common.check_at_least("expand", self.expand)
    h = self.d_ssm if self.d_ssm is not None else self.d_model // 4
    _common.check_at_least("d_ssm", h)
    _common.check_even("d_state", self.d_state, "the states come in complex-conjugate pairs")
    return self.expand * self.d_model, h

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> DiagSSMCache:
    del max_len, dtype  # constant-size complex64 state
    _, h = self._dims()
    return _common.empty_diag_cache(batch_size, h, self.d_state)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], DiagSSMCache | None)."""
    del positions, deterministic
    f, h = self._dims()

    def dense(width, in_axis, out_axis, name):
      return nn.Dense(width, use_bias=self.use_bias, dtype=self.dtype, name=name,
                      param_dtype=self.param_dtype,
                      kernel_init=axes.param(nn.initializers.lecun_normal(), in_axis, out_axis),
                      bias_init=axes.param(nn.initializers.zeros, out_axis))

    x = x.astype(self.dtype)
    v = jax.nn.gelu(dense(f, axes.EMBED, axes.MLP, "gate_proj")(x))              # [b, t, f]
    u = jax.nn.gelu(dense(h, axes.EMBED, axes.HEADS, "ssm_in_proj")(x))          # [b, t, h]
    starts, last_seg = _common.starts_and_seg(segment_ids, cache, x.shape[0])
    ssm = dss_ssm(h, self.d_state, dt_min=self.dt_min, dt_max=self.dt_max,
                  conv_impl=self.conv_impl, scan_impl=self.scan_impl, chunk_size=self.chunk_size,
                  param_dtype=self.param_dtype, axis=axes.HEADS, name="dss")
    y, state = ssm(u[..., None], starts=starts, state=None if cache is None else cache.state,
                   recurrent=cache is not None or segment_ids is not None)       # [b, t, h, 1]
    uc = dense(f, axes.HEADS, axes.MLP, "ssm_out_proj")(y[..., 0].astype(self.dtype))
    o = dense(self.d_model, axes.MLP, axes.EMBED, "out_proj")(uc * v)             # [b, t, d]
    return o, None if cache is None else DiagSSMCache(state, last_seg)
