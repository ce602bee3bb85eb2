"""DSS: diagonal state space layer (Gupta et al., "Diagonal State Spaces are as Effective as
Structured State Spaces", NeurIPS 2022), the DSS-exp variant.

Each of the D = d_model channels is a diagonal SSM with N/2 listed complex states (conjugates
implied); DSS-exp's kernel is a ZOH-discretised diagonal SSM with B = 1 and C = W:

    Λ = -exp(log_a_re) + i a_im,  init: the eigenvalues of HiPPO-LegS's normal part (DSS's
        "skew-HiPPO" init, Re Λ = -1/2);  W ~ CN(0, 1);  Δ ~ LogUniform[dt_min, dt_max];  D ~ N(0,1)
    K_k = 2 Re Σ_n W_n (e^{Λ_n Δ} - 1)/Λ_n · e^{Λ_n k Δ}          (`ssm_kernels.s4d_kernel`, B = 1)
    y = K * u + D ⊙ u;  out = SSMOutput(GELU(y))

Variant: DSS-exp, not DSS-softmax. DSS-softmax normalises e^{Λ_n k Δ} over the kernel's L
positions, so its kernel changes with the sequence length: no fixed recurrence reproduces it
for every T, and decoding from a constant-size state would disagree with the parallel form.
DSS-exp is an LTI SSM (the paper reports it on par), so decoding runs the same SSM as the
recurrence h_t = e^{ΛΔ} h_{t-1} + (e^{ΛΔ} - 1)/Λ u_t (complex `linear_scan`); packed documents
reset it at document starts. Re Λ < 0 is enforced by the -exp(·) parameterisation (DSS-exp's
restriction).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.ssm import _common
from seqmix.mixers.ssm._common import DiagSSMCache
from seqmix.parallel import axes


def dss_ssm(channels, d_state, *, dt_min, dt_max, conv_impl, scan_impl, chunk_size, param_dtype,
            name, axis=axes.EMBED):
  """The DSS-exp SSM over `channels` channels (also GSS's SSM)."""
  return _common.DiagSSM(channels, d_state, ssm_init="hippo", disc="zoh", learn_b=False,
                         dt_min=dt_min, dt_max=dt_max, conv_impl=conv_impl, scan_impl=scan_impl,
                         chunk_size=chunk_size, param_dtype=param_dtype, axis=axis,
                         name=name)


@registry.register(
    "dss", paper="Diagonal State Spaces are as Effective as Structured State Spaces",
    year=2022, venue="NeurIPS", family="ssm",
    op="ssm_kernels.s4d_kernel + conv.causal_conv; scan.linear_scan (decode)",
    parents=("s4",), constant_state=True,
    test_kwargs={"d_state": 8})
class DSS(MixerBase):
  """DSS-exp layer.  x [B, T, D] -> y [B, T, D].

  d_state: N, the state size of each channel's SSM (even: N/2 conjugate pairs).
  dt_min, dt_max: range of the log-uniform init of the step Δ (one per channel).
  output: "glu" (GELU then Linear D -> 2D + GLU) | "linear" | "half_glu".
  conv_impl: `causal_conv` impl of the parallel form ("auto" | "reference" | "fft").
  scan_impl, chunk_size: `linear_scan` impl and chunk size of the recurrence.
  """
  d_state: int = 64
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  output: str = "glu"
  conv_impl: str = "auto"
  scan_impl: str = "auto"
  chunk_size: int = 64

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> DiagSSMCache:
    del max_len, dtype  # constant-size complex64 state
    _common.check_even("d_state", self.d_state, "the states come in complex-conjugate pairs")
    return _common.empty_diag_cache(batch_size, self.d_model, self.d_state)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], DiagSSMCache | None)."""
    del positions, deterministic
    starts, last_seg = _common.starts_and_seg(segment_ids, cache, x.shape[0])
    ssm = dss_ssm(self.d_model, self.d_state, dt_min=self.dt_min, dt_max=self.dt_max,
                  conv_impl=self.conv_impl, scan_impl=self.scan_impl, chunk_size=self.chunk_size,
                  param_dtype=self.param_dtype, name="ssm")
    y, state = ssm(x.astype(self.dtype)[..., None], starts=starts,               # [b, t, d, 1]
                   state=None if cache is None else cache.state,
                   recurrent=cache is not None or segment_ids is not None)
    y = jax.nn.gelu(y[..., 0]).astype(self.dtype)                                # [b, t, d]
    y = _common.SSMOutput(self.d_model, self.output, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="output")(y)
    return y, None if cache is None else DiagSSMCache(state, last_seg)
