"""Pieces shared by the convolution-family SSM mixers (S4, S4D, DSS, S5, H3, GSS).

Two ways to run one linear time-invariant SSM over a sequence, which agree exactly:

  convolution  y = K * u with the kernel K [T, H] from `seqmix.ops.ssm_kernels` through
               `seqmix.ops.conv.causal_conv` (impl "fft" or "auto" for long kernels). Used for
               the parallel forward of one unpacked sequence (cache=None, segment_ids=None).
  recurrence   h_t = Ā h_{t-1} + B̄ u_t, y_t = Re(C̄ h_t), a constant-size complex state. Used
               when decoding (any number of new tokens from a cache) and for packed documents.

Packed documents: a long convolution cannot be reset by a gate, so with `segment_ids` the
mixers run the recurrence with a hard reset (`a_t = 0` for `linear_scan`) at each document's
first token: O(T·H·N) work and a [B, T, H, N] complex intermediate (the per-document masked
Toeplitz product would cost O(T²·H)). The diagonal SSMs (S4D, DSS, H3, GSS, S5) go through
`seqmix.ops.scan.linear_scan`; S4's DPLR state is run as the dense discrete recurrence
(`dense_ssm_scan`, O(T·H·M²) for M = 2N' states: fine for S4's small N).
"""

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqmix.mixers.common import segments
from seqmix.ops import conv as conv_ops
from seqmix.ops import scan as scan_ops
from seqmix.ops import ssm_kernels
from seqmix.parallel import axes

_HIGHEST = jax.lax.Precision.HIGHEST  # complex einsums of the recurrences: no TF32 / bf16 passes


class DiagSSMCache(NamedTuple):
  """Decoding cache of a diagonal SSM mixer (S4D, DSS, GSS)."""
  state: jax.Array  # [B, H, N', E] complex64: the N' listed states of each of H channels
  seg: jax.Array    # [B] int32 segment id of the last token seen (-1 before the first)


# Validation: errors say which value, what was expected and how to fix it.


def empty_diag_cache(batch_size: int, channels: int, d_state: int) -> DiagSSMCache:
  """A zero DiagSSMCache: d_state/2 complex states (conjugate pairs) per channel, no segment."""
  return DiagSSMCache(jnp.zeros((batch_size, channels, d_state // 2, 1), jnp.complex64),
                      jnp.full((batch_size,), -1, jnp.int32))


def check_at_least(name: str, value, low: int = 1):
  if not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be >= {low}; got {value!r}. Set {name} to an integer >= {low}.")


def check_even(name: str, value: int, why: str):
  check_at_least(name, value, 1)
  if value % 2:
    raise ValueError(f"{name}={value} must be even ({why}); use {name}={value + 1}.")


def check_step_range(dt_min: float, dt_max: float):
  if not 0 < dt_min <= dt_max:
    raise ValueError(f"need 0 < dt_min <= dt_max for the step-size init; got dt_min={dt_min}, "
                     f"dt_max={dt_max} (the papers use dt_min=1e-3, dt_max=1e-1).")


def check_choice(name: str, value, choices):
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}.")


# Initialisers (all return float arrays; complex values are stored as [..., 2] (re, im) pairs so
# optimisers and sharding only ever see real parameters).


def log_step_init(dt_min: float, dt_max: float):
  """log Δ ~ U(log dt_min, log dt_max) (S4, S4D, DSS, S5, H3)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, jnp.float32, math.log(dt_min),
                              math.log(dt_max)).astype(dtype)
  return init


def constant_init(value):
  """A fixed init-time constant (numpy), broadcast to the parameter's shape."""
  value = np.asarray(value)

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), shape).astype(dtype)
  return init


def complex_constant_init(value):
  """A fixed complex constant stored as [..., 2] (re, im) pairs."""
  value = np.asarray(value)
  return constant_init(np.stack([value.real, value.imag], axis=-1))


def complex_normal_init(std: float = 1.0):
  """Complex normal with E|z|² = std² (real and imaginary parts N(0, std²/2)), as [..., 2]."""
  def init(key, shape, dtype=jnp.float32):
    return (std * math.sqrt(0.5) * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return init


def as_complex(pair):
  """[..., 2] float (re, im) -> [...] complex64."""
  pair = pair.astype(jnp.float32)
  return jax.lax.complex(pair[..., 0], pair[..., 1])


# The diagonal SSM (S4D, DSS, H3's diagonal SSM, GSS's DSS).

DIAG_INITS = ("lin", "inv", "hippo")


def diag_init(init: str, n: int):
  """The N' = N/2 listed eigenvalues of A [N'] complex128 for `init`.

  lin: S4D-Lin, -1/2 + iπk.  inv: S4D-Inv, -1/2 + i N/π (N/(2k+1) - 1).
  hippo: the eigenvalues of HiPPO-LegS's normal part (DSS's skew-HiPPO init), -1/2 + iω.
  """
  check_choice("ssm_init", init, DIAG_INITS)
  if init == "lin":
    return ssm_kernels.s4d_lin(n)
  if init == "inv":
    return ssm_kernels.s4d_inv(n)
  return ssm_kernels.dplr_legs(n, conj=True)[0]


def diag_ssm_scan(u, a_bar, b_bar, c_scaled, *, starts=None, h0=None, impl="auto",
                  chunk_size=64):
  """The diagonal recurrence through `linear_scan`, E input columns sharing each channel's SSM.

  Args:
    u: [B, T, H, E] real inputs (E columns per channel: 1 for a plain SSM, d_h² for H3's k vᵀ).
    a_bar, b_bar, c_scaled: [H, N'] complex (`ssm_kernels.s4d_discrete`'s output).
    starts: [B, T] bool document starts (state reset to 0 there) or None.
    h0: [B, H, N', E] complex initial state or None.
    impl, chunk_size: passed to `linear_scan`.

  Returns:
    (y [B, T, H, E] float32 = Re Σ_n c_n h_t,n, h_T [B, H, N', E] complex64).
  """
  b, t, h, e = u.shape
  n = a_bar.shape[-1]
  x = b_bar[None, None, :, :, None] * u.astype(jnp.float32)[:, :, :, None, :]  # [b, t, h, n, e]
  a = jnp.broadcast_to(a_bar[None, None, :, :, None], (b, t, h, n, e))
  a = segments.reset_decay(a, starts)
  hs, h_last = scan_ops.linear_scan(a, x, initial_state=h0, chunk_size=chunk_size, impl=impl)
  y = jnp.einsum("hn,bthne->bthe", c_scaled, hs, precision=_HIGHEST).real  # [b, t, h, e]
  return y, h_last


def conv_with_kernel(u, kernel, *, impl="auto"):
  """u [B, T, H, E] through the kernel [T, H] (shared by the E columns of a channel) -> f32."""
  b, t, h, e = u.shape
  k = jnp.repeat(kernel, e, axis=1).astype(u.dtype)                   # [t, h·e]
  y, _ = conv_ops.causal_conv(u.reshape(b, t, h * e), k, impl=impl)   # [b, t, h·e]
  return y.reshape(b, t, h, e).astype(jnp.float32)                    # [b, t, h, e]


class DiagSSM(nn.Module):
  """H independent diagonal SSMs with a D skip.  u [B, T, H, E] -> y [B, T, H, E].

  Each channel h has N' = d_state/2 complex states with implied conjugates (a real SSM):
  A = -exp(log_a_re) + i·a_im, B (trainable or fixed to 1), C, log Δ, D; the E columns of a
  channel share its SSM. The kernel (parallel form) and the recurrence (decoding, packed
  documents) come from `ssm_kernels.s4d_kernel` / `s4d_discrete` with the same parameters.

  channels: H. d_state: N (even; N' = N/2 listed states).
  ssm_init: "lin" | "inv" (S4D) | "hippo" (DSS's skew-HiPPO eigenvalues).
  disc: "zoh" | "bilinear".
  learn_b: B is a parameter initialised to 1 (S4D, H3); False: B fixed to 1 (DSS-exp, whose W
    is C·B).
  c_std: E|C|² at init (complex normal).
  dt_min, dt_max: range of the log-uniform Δ init.
  conv_impl: `causal_conv` impl; scan_impl, chunk_size: `linear_scan` impl and chunk size.
  axis: logical axis name of the channel dimension.
  """
  channels: int
  d_state: int
  ssm_init: str = "lin"
  disc: str = "zoh"
  learn_b: bool = True
  c_std: float = 1.0
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  conv_impl: str = "auto"
  scan_impl: str = "auto"
  chunk_size: int = 64
  axis: str = axes.EMBED
  param_dtype: Any = jnp.float32

  def check(self):
    check_even("d_state", self.d_state, "the states come in complex-conjugate pairs")
    check_choice("ssm_init", self.ssm_init, DIAG_INITS)
    check_choice("disc", self.disc, ssm_kernels.DISCRETISATIONS)
    check_step_range(self.dt_min, self.dt_max)

  def setup(self):
    self.check()
    h, n2 = self.channels, self.d_state // 2
    a0 = diag_init(self.ssm_init, self.d_state)
    pd = self.param_dtype
    self.log_a_re = self.param("log_a_re", axes.param(constant_init(np.log(-a0.real)),
                                                      self.axis, axes.STATE), (h, n2), pd)
    self.a_im = self.param("a_im", axes.param(constant_init(a0.imag), self.axis, axes.STATE),
                           (h, n2), pd)
    if self.learn_b:
      self.b = self.param("b", axes.param(complex_constant_init(1.0 + 0j), self.axis, axes.STATE,
                                          axes.NONE), (h, n2, 2), pd)
    self.c = self.param("c", axes.param(complex_normal_init(self.c_std), self.axis, axes.STATE,
                                        axes.NONE), (h, n2, 2), pd)
    self.log_step = self.param("log_step", axes.param(log_step_init(self.dt_min, self.dt_max),
                                                      self.axis), (h,), pd)
    self.d = self.param("d", axes.param(nn.initializers.normal(1.0), self.axis), (h,), pd)

  def _abc(self):
    a = jax.lax.complex(-jnp.exp(self.log_a_re.astype(jnp.float32)),
                        self.a_im.astype(jnp.float32))                  # [h, n']
    b = as_complex(self.b) if self.learn_b else jnp.ones_like(a)
    return a, b, as_complex(self.c), self.log_step.astype(jnp.float32)

  def kernel(self, length: int):
    """K [length, H] float32."""
    a, b, c, log_step = self._abc()
    return ssm_kernels.s4d_kernel(a, b, c, log_step, L=length, disc=self.disc)

  def discrete(self):
    """(Ā, B̄, C_scaled) [H, N'] complex64 of the recurrence."""
    a, b, c, log_step = self._abc()
    return ssm_kernels.s4d_discrete(a, b, c, log_step, disc=self.disc)

  def init_state(self, batch_size: int, columns: int = 1):
    return jnp.zeros((batch_size, self.channels, self.d_state // 2, columns), jnp.complex64)

  def __call__(self, u, *, starts=None, state=None, recurrent: bool = False):
    """u [B, T, H, E] -> (y [B, T, H, E] f32, final state [B, H, N', E] or None).

    recurrent=False: the convolution (no state in or out; `starts` must be None).
    recurrent=True: the recurrence from `state` (zeros if None) with resets at `starts`.
    """
    skip = self.d.astype(jnp.float32)[:, None] * u.astype(jnp.float32)  # [b, t, h, e]
    if not recurrent:
      if starts is not None or state is not None:
        raise ValueError("DiagSSM: the convolution form takes no state and no resets.")
      return conv_with_kernel(u, self.kernel(u.shape[1]), impl=self.conv_impl) + skip, None
    a_bar, b_bar, c_scaled = self.discrete()
    y, h_last = diag_ssm_scan(u, a_bar, b_bar, c_scaled, starts=starts, h0=state,
                              impl=self.scan_impl, chunk_size=self.chunk_size)
    return y + skip, h_last


def dense_ssm_scan(u, a_bar, b_bar, c_bar, *, starts=None, h0=None):
  """The dense discrete recurrence of S4, one SSM per channel.

  h_t = Ā h_{t-1} + B̄ u_t (h reset to 0 before a document start), y_t = Re(C̄ h_t).

  Args:
    u: [B, T, H] real.
    a_bar: [H, M, M], b_bar, c_bar: [H, M] complex (`ssm_kernels.s4_discrete`).
    starts: [B, T] bool or None. h0: [B, H, M] complex or None.

  Returns:
    (y [B, T, H] float32, h_T [B, H, M] complex64).
  """
  b, t, h = u.shape
  m = a_bar.shape[-1]
  h0 = jnp.zeros((b, h, m), jnp.complex64) if h0 is None else h0.astype(jnp.complex64)
  starts = jnp.zeros((b, t), bool) if starts is None else starts

  def step(state, inp):
    u_t, s_t = inp                                                       # [b, h], [b]
    state = jnp.where(s_t[:, None, None], 0, state)
    state = (jnp.einsum("hmn,bhn->bhm", a_bar, state, precision=_HIGHEST)
             + b_bar[None] * u_t[:, :, None])                            # [b, h, m]
    y = jnp.einsum("hm,bhm->bh", c_bar, state, precision=_HIGHEST).real  # [b, h]
    return state, y

  h_last, ys = jax.lax.scan(step, h0, (jnp.moveaxis(u.astype(jnp.float32), 1, 0),
                                       jnp.moveaxis(starts, 1, 0)))
  return jnp.moveaxis(ys, 0, 1), h_last                                 # [b, t, h]


# The layer output of the S4 family: activation, then a position-wise mixing of channels.

OUTPUTS = ("glu", "half_glu", "linear")


class SSMOutput(nn.Module):
  """Position-wise output of an SSM layer.  y [B, T, D] (already activated) -> [B, T, D].

  kind: "glu": W y -> [a, g], a ⊙ σ(g) (S4's block output; Dense D -> 2D).
        "half_glu": y ⊙ σ(W y) (S5's "half GLU").
        "linear": W y (the original S4 paper).
  """
  features: int
  kind: str = "glu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y):
    check_choice("output", self.kind, OUTPUTS)
    width = 2 * self.features if self.kind == "glu" else self.features
    z = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj",
                 kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED, axes.MLP),
                 bias_init=axes.param(nn.initializers.zeros, axes.MLP))(y)
    if self.kind == "glu":
      return z[..., :self.features] * jax.nn.sigmoid(z[..., self.features:])
    if self.kind == "half_glu":
      return y * jax.nn.sigmoid(z)
    return z


def starts_and_seg(segment_ids, cache, batch_size: int):
  """(document starts [B, T] or None, the new cache's last segment id [B] int32)."""
  starts = segments.segment_starts(segment_ids,
                                   cache_last_id=None if cache is None else cache.seg)
  return starts, segments.last_segment_id(segment_ids, batch_size)
