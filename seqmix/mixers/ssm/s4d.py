"""S4D: diagonal state space layer (Gu et al., "On the Parameterization and Initialization of
Diagonal State Space Models", NeurIPS 2022).

Each of the D = d_model channels is its own single-input single-output SSM with a diagonal
complex A of N/2 listed states (their conjugates implied, so the SSM is real):

    A_n = -exp(log_a_re_n) + i a_im_n,  B_n (init 1),  C_n ~ CN(0, 1),  Δ = exp(log_step)
    S4D-Lin: A_n = -1/2 + iπn      S4D-Inv: A_n = -1/2 + i N/π (N/(2n+1) - 1)
    ZOH:      Ā = e^{ΔA}, B̄ = (e^{ΔA} - 1)/A · B
    bilinear: Ā = (1 + ΔA/2)/(1 - ΔA/2), B̄ = Δ B/(1 - ΔA/2)
    y = K * u + D ⊙ u,  K_l = 2 Re Σ_n C_n B̄_n Ā_n^l     (Vandermonde kernel, FFT convolution)
    out = SSMOutput(GELU(y))                              (the S4 block: GELU, then Linear + GLU)

Parallel form: the kernel of length T through `causal_conv`. Decoding and packed documents:
the same SSM as the diagonal recurrence h_t = Ā h_{t-1} + B̄ u_t (complex `linear_scan`, reset
at document starts). Δ ~ LogUniform[dt_min, dt_max] per channel, D ~ N(0, 1), as the paper.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.ssm import _common
from seqmix.mixers.ssm._common import DiagSSMCache


@registry.register(
    "s4d", paper="On the Parameterization and Initialization of Diagonal State Space Models",
    year=2022, venue="NeurIPS", family="ssm",
    op="ssm_kernels.s4d_kernel + conv.causal_conv; scan.linear_scan (decode)",
    parents=("s4", "dss"), constant_state=True,
    test_kwargs={"d_state": 8})
class S4D(MixerBase):
  """S4D layer.  x [B, T, D] -> y [B, T, D].

  d_state: N, the state size of each channel's SSM (even: N/2 conjugate pairs).
  ssm_init: "lin" (S4D-Lin) | "inv" (S4D-Inv) imaginary parts of A (named ssm_init, not
    init, which would shadow `nn.Module.init`).
  disc: "zoh" | "bilinear" discretisation.
  dt_min, dt_max: range of the log-uniform init of the step Δ (one per channel).
  output: "glu" (GELU then Linear D -> 2D + GLU, the S4 block) | "linear" | "half_glu".
  conv_impl: `causal_conv` impl of the parallel form ("auto" | "reference" | "fft").
  scan_impl, chunk_size: `linear_scan` impl and chunk size of the recurrence.
  """
  d_state: int = 64
  ssm_init: str = "lin"
  disc: str = "zoh"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  output: str = "glu"
  conv_impl: str = "auto"
  scan_impl: str = "auto"
  chunk_size: int = 64

  def _ssm(self):
    return _common.DiagSSM(self.d_model, self.d_state, ssm_init=self.ssm_init, disc=self.disc,
                           learn_b=True, dt_min=self.dt_min, dt_max=self.dt_max,
                           conv_impl=self.conv_impl, scan_impl=self.scan_impl,
                           chunk_size=self.chunk_size, param_dtype=self.param_dtype, name="ssm")

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> DiagSSMCache:
    del max_len, dtype  # constant-size complex64 state
    _common.check_even("d_state", self.d_state, "the states come in complex-conjugate pairs")
    return _common.empty_diag_cache(batch_size, self.d_model, self.d_state)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], DiagSSMCache | None)."""
    del positions, deterministic
    b = x.shape[0]
    u = x.astype(self.dtype)[..., None]                                  # [b, t, d, 1]
    starts, last_seg = _common.starts_and_seg(segment_ids, cache, b)
    recurrent = cache is not None or segment_ids is not None
    y, state = self._ssm()(u, starts=starts, state=None if cache is None else cache.state,
                           recurrent=recurrent)
    y = jax.nn.gelu(y[..., 0]).astype(self.dtype)                        # [b, t, d]
    y = _common.SSMOutput(self.d_model, self.output, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="output")(y)
    return y, None if cache is None else DiagSSMCache(state, last_seg)

