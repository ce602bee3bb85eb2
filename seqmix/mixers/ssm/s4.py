"""S4: structured state space layer (Gu et al., "Efficiently Modeling Long Sequences with
Structured State Spaces", ICLR 2022).

Each of the D = d_model channels is its own SSM with N states, A in diagonal-plus-low-rank form
in HiPPO-LegS's eigenbasis (N/2 listed states, their conjugates implied):

    A = diag(Λ) - P P^*,  Λ = -exp(log_lambda_re) + i lambda_im,  Q = P (HiPPO-LegS)
    init: (Λ, P, B) = `ssm_kernels.dplr_legs(N)` (Re Λ = -1/2), C̃ ~ CN(0, 1),
          Δ ~ LogUniform[dt_min, dt_max] per channel, D ~ N(0, 1)
    bilinear discretisation; y = K * u + D ⊙ u with K [l_max] from `ssm_kernels.s4_kernel`
    (Cauchy + Woodbury + inverse FFT); out = SSMOutput(GELU(y))  (the S4 block: Linear + GLU)

C is S4's C̃ = C̄ (I - Ā^{l_max}) for the fixed kernel length `l_max`, so one set of parameters
is one SSM whatever T: the parallel form computes the l_max kernel and uses its first T taps
(T <= l_max; a longer sequence is an error asking for a larger l_max), decoding recovers
C̄ = C̃ (I - Ā^{l_max})^{-1} (`ssm_kernels.s4_discrete`).

Decoding and packed documents run the DENSE discrete recurrence h_t = Ā h_{t-1} + B̄ u_t
(Ā [D, N, N] complex from `s4_discrete`; `_common.dense_ssm_scan`), O(N²) per channel and
token — chosen over diagonalising Ā (a non-Hermitian eigendecomposition per channel, with no
gradient on every backend) since S4's N is small (64). The state is [B, D, N] complex64.

Deviation: Re Λ is parameterised as -exp(·) (the official code's default "exp" transform, which
keeps A stable), not learned unconstrained as in the paper's first version.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.ssm import _common
from seqmix.ops import conv as conv_ops
from seqmix.ops import ssm_kernels
from seqmix.parallel import axes


class S4Cache(NamedTuple):
  state: jax.Array  # [B, D, N] complex64: the N/2 listed states, then their conjugates
  seg: jax.Array    # [B] int32 segment id of the last token seen (-1 before the first)


@registry.register(
    "s4", paper="Efficiently Modeling Long Sequences with Structured State Spaces",
    year=2022, venue="ICLR", family="ssm",
    op="ssm_kernels.s4_kernel + conv.causal_conv; ssm_kernels.s4_discrete (decode)",
    parents=("hippo", "lssl"), constant_state=True,
    test_kwargs={"d_state": 8, "l_max": 64})
class S4(MixerBase):
  """S4 layer (DPLR / HiPPO-LegS).  x [B, T, D] -> y [B, T, D].

  d_state: N, the state size of each channel's SSM (even: N/2 conjugate pairs).
  l_max: kernel length that C̃ refers to; the parallel form needs T <= l_max.
  dt_min, dt_max: range of the log-uniform init of the step Δ (one per channel).
  output: "glu" (GELU then Linear D -> 2D + GLU, the S4 block) | "linear" | "half_glu".
  conv_impl: `causal_conv` impl of the parallel form ("auto" | "reference" | "fft").
  """
  d_state: int = 64
  l_max: int = 1024
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  output: str = "glu"
  conv_impl: str = "auto"

  def _check(self):
    _common.check_even("d_state", self.d_state, "the states come in complex-conjugate pairs")
    _common.check_at_least("l_max", self.l_max)
    _common.check_step_range(self.dt_min, self.dt_max)
    _common.check_choice("output", self.output, _common.OUTPUTS)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> S4Cache:
    del max_len, dtype  # constant-size complex64 state
    self._check()
    return S4Cache(jnp.zeros((batch_size, self.d_model, self.d_state), jnp.complex64),
                   jnp.full((batch_size,), -1, jnp.int32))

  def _params(self):
    """(Λ [D, N'], P [D, N'], B [D, N'], C̃ [D, N'] complex64, log Δ [D])."""
    d, n2 = self.d_model, self.d_state // 2
    lam, p, b, _ = ssm_kernels.dplr_legs(self.d_state, conj=True)
    pd = self.param_dtype
    ch = (axes.EMBED, axes.STATE)
    log_re = self.param("log_lambda_re", axes.param(_common.constant_init(np.log(-lam.real)),
                                                    *ch), (d, n2), pd)
    im = self.param("lambda_im", axes.param(_common.constant_init(lam.imag), *ch), (d, n2), pd)
    p = self.param("p", axes.param(_common.complex_constant_init(p), *ch, axes.NONE),
                   (d, n2, 2), pd)
    b = self.param("b", axes.param(_common.complex_constant_init(b), *ch, axes.NONE),
                   (d, n2, 2), pd)
    c = self.param("c", axes.param(_common.complex_normal_init(1.0), *ch, axes.NONE),
                   (d, n2, 2), pd)
    log_step = self.param("log_step", axes.param(_common.log_step_init(self.dt_min, self.dt_max),
                                                 axes.EMBED), (d,), pd)
    lam = jax.lax.complex(-jnp.exp(log_re.astype(jnp.float32)), im.astype(jnp.float32))
    return (lam, _common.as_complex(p), _common.as_complex(b), _common.as_complex(c),
            log_step.astype(jnp.float32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], S4Cache | None)."""
    del positions, deterministic
    self._check()
    b, t, _ = x.shape
    u = x.astype(self.dtype)
    lam, p, bb, c, log_step = self._params()
    skip = self.param("d", axes.param(nn.initializers.normal(1.0), axes.EMBED), (self.d_model,),
                      self.param_dtype).astype(jnp.float32)
    starts, last_seg = _common.starts_and_seg(segment_ids, cache, b)
    new_cache = None
    if cache is None and segment_ids is None:
      if t > self.l_max:
        raise ValueError(f"S4: sequence length T={t} exceeds l_max={self.l_max}, the kernel "
                         f"length C̃ refers to; set l_max >= {t}.")
      kernel = ssm_kernels.s4_kernel(lam, p, bb, c, log_step, L=self.l_max)[:t]  # [t, d]
      y, _ = conv_ops.causal_conv(u, kernel.astype(u.dtype), impl=self.conv_impl)
      y = y.astype(jnp.float32)
    else:
      a_bar, b_bar, c_bar = ssm_kernels.s4_discrete(lam, p, bb, c, log_step, L=self.l_max)
      y, state = _common.dense_ssm_scan(u, a_bar, b_bar, c_bar, starts=starts,
                                        h0=None if cache is None else cache.state)
      if cache is not None:
        new_cache = S4Cache(state, last_seg)
    y = jax.nn.gelu(y + skip * u.astype(jnp.float32)).astype(self.dtype)  # [b, t, d]
    y = _common.SSMOutput(self.d_model, self.output, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="output")(y)
    return y, new_cache
