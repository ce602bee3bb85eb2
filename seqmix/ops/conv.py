"""Causal depthwise convolution: short convs (Mamba, DeltaNet, H3) and long ones (Hyena, S4).

    y_t = sum_{s=0}^{L-1} k_s ⊙ u_{t-s}

`k[0]` multiplies the current token. torch / Mamba `Conv1d` weights (`[D, 1, L]`) are the
time-reverse of this layout: `k = w[:, 0, ::-1].T`. Inputs before the sequence (`u_{<0}`) come
from `initial_state`, the previous L-1 inputs oldest first (zeros by default), and the returned
state is the last L-1 rows of `concat(initial_state, u)`, so a prefill followed by one-token
steps reproduces the whole-sequence output.

Forms (`impl`):
  reference  the direct sum over the L taps in float32: the oracle.
  fft        float32 FFT convolution over a padded length >= T + L - 1 (no wrap-around).
  monarch    the same circular convolution with the DFT as a Monarch product (two block-diagonal
             matmuls and a twiddle, `seqmix.ops.monarch`; M2): O(n^1.5) matmul work, complex64.
  auto       reference for short kernels, fft for long ones (`_use_fft`).
"""

import jax
import jax.numpy as jnp

from seqmix.ops import monarch as monarch_ops
from seqmix.ops._impl import resolve

_AVAILABLE = {"reference": True, "fft": True, "monarch": True}

# Kernels up to this length are summed with unrolled static slices (XLA fuses them into one
# loop); longer kernels loop over taps with `lax.scan` to keep the program small.
_UNROLL_TAPS = 32

# `impl="auto"` picks fft when L >= _FFT_MIN_TAPS and T >= _FFT_MIN_TIME. Measured on the
# 2-core CPU dev machine (jit, forward+backward, B=2, D=64, float32, Nov 2026): the direct sum
# costs ~T·L, the FFT ~(T+L)·log(T+L) with a larger constant. Direct vs fft in ms:
#   T=1024: L=16 2.5 vs 3.4, L=32 5.6 vs 3.4, L=1024 541 vs 3.5
#   T=128:  L=16 0.26 vs 0.36, L=32 0.54 vs 0.44, L=128 2.8 vs 0.35
#   T=32:   L=32 0.24 vs 0.24, L=64 0.95 vs 0.36
#   T=8:    L=64 0.11 vs 0.35, L=1024 4.1 vs 6.8 (short calls such as decoding stay direct)
_FFT_MIN_TAPS = 32
_FFT_MIN_TIME = 32


def causal_conv(u, k, *, initial_state=None, impl: str = "auto"):
  """Causal depthwise convolution with carried input state.

  Args:
    u: inputs `[B, T, D]`.
    k: kernel `[L, D]`, same dtype as u; `k[0]` multiplies the current token.
    initial_state: `[B, L-1, D]` (the previous L-1 inputs, oldest first) or None (zeros).
    impl: "reference" | "fft" | "monarch" | "auto" ("auto" never picks "monarch").

  Returns:
    (y `[B, T, D]` in u's dtype, state `[B, L-1, D]` in u's dtype).
  """
  _check(u, k, initial_state)
  # "auto" depends on the shapes, not the platform (see `_use_fft`); resolve logs each choice.
  by_shape = "fft" if _use_fft(u.shape[1], k.shape[0]) else "reference"
  impl = resolve("causal_conv", impl, _AVAILABLE, {"default": by_shape})
  b, t, d = u.shape
  l1 = k.shape[0] - 1
  past = (jnp.zeros((b, l1, d), u.dtype) if initial_state is None
          else initial_state.astype(u.dtype))
  full = jnp.concatenate([past, u], axis=1)                # u_{-(L-1)} .. u_{T-1}  [b, l1+t, d]
  state = full[:, full.shape[1] - l1:]
  xf, kf = full.astype(jnp.float32), k.astype(jnp.float32)
  if impl == "fft":
    y = _fft(xf, kf, t)
  elif impl == "monarch":
    y = _monarch(xf, kf, t)
  else:
    y = _direct(xf, kf, t)
  return y.astype(u.dtype), state


def _use_fft(t: int, taps: int) -> bool:
  return taps >= _FFT_MIN_TAPS and t >= _FFT_MIN_TIME


def _check(u, k, initial_state):
  if u.ndim != 3:
    raise ValueError(f"causal_conv: u must be [B, T, D]; got {u.shape=}.")
  if k.ndim != 2 or k.shape[1] != u.shape[2] or k.shape[0] < 1:
    raise ValueError(f"causal_conv: k must be [L, D] with L >= 1 and D = {u.shape[2]}; "
                     f"got {k.shape=} for {u.shape=}.")
  if k.dtype != u.dtype:
    raise ValueError(f"causal_conv: u and k must share a dtype; got {u.dtype=} {k.dtype=} "
                     "(cast the kernel to the compute dtype first).")
  want = (u.shape[0], k.shape[0] - 1, u.shape[2])
  if initial_state is not None and initial_state.shape != want:
    raise ValueError(f"causal_conv: initial_state must be [B, L-1, D] = {want}; "
                     f"got {initial_state.shape=}.")


def _direct(x, k, t):
  """y_t = sum_s k_s x_{L-1+t-s}: x float32 `[B, L-1+T, D]`, k float32 `[L, D]`."""
  taps = k.shape[0]
  l1 = taps - 1
  if taps <= _UNROLL_TAPS:
    y = k[0] * x[:, l1:l1 + t]
    for s in range(1, taps):
      y = y + k[s] * x[:, l1 - s:l1 - s + t]
    return y

  def tap(y, ks):
    k_s, s = ks
    return y + k_s * jax.lax.dynamic_slice_in_dim(x, l1 - s, t, axis=1), None

  y, _ = jax.lax.scan(tap, jnp.zeros((x.shape[0], t, x.shape[2]), jnp.float32),
                      (k, jnp.arange(taps)))
  return y


def _fft(x, k, t):
  """Same as `_direct` through a float32 real FFT of a power-of-two length >= L-1+T."""
  taps = k.shape[0]
  l1 = taps - 1
  # Circular convolution of length n equals the linear one at outputs l1 .. l1+t-1 whenever
  # n >= l1 + t: those outputs only read x at indices 0 .. l1+t-1, none wrapped.
  n = 1 << max(l1 + t - 1, 1).bit_length()
  xf = jnp.fft.rfft(x, n=n, axis=1)                        # [b, n//2+1, d]
  kf = jnp.fft.rfft(k, n=n, axis=0)                        # [n//2+1, d]
  y = jnp.fft.irfft(xf * kf[None], n=n, axis=1)            # [b, n, d]
  return y[:, l1:l1 + t]


def _monarch(x, k, t):
  """Same as `_fft` with the DFT of length n computed as a Monarch product (complex64)."""
  taps = k.shape[0]
  l1 = taps - 1
  n = 1 << max(l1 + t - 1, 1).bit_length()
  xp = jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0)))
  kp = jnp.pad(k, ((0, n - taps), (0, 0)))
  xf = monarch_ops.monarch_dft(xp, axis=1)                          # [b, n, d]
  kf = monarch_ops.monarch_dft(kp, axis=0)                          # [n, d]
  y = monarch_ops.monarch_idft(xf * kf[None], axis=1).real          # [b, n, d]
  return y[:, l1:l1 + t]


def dynamic_causal_conv(u, k, *, initial_state=None, impl: str = "auto"):
  """Causal depthwise convolution with a kernel per output step (DynamicConv).

      y_t = Σ_{s=0}^{L-1} k_{t,s} ⊙ u_{t-s}

  Args:
    u: inputs `[B, T, D]`.
    k: kernels `[B, T, L, D]`, same dtype as u; `k[:, t, 0]` multiplies the current token.
    initial_state: `[B, L-1, D]` (the previous L-1 inputs, oldest first) or None (zeros).
    impl: "reference" (the direct sum over the L taps in float32) | "auto" (= reference).

  Returns:
    (y `[B, T, D]` in u's dtype, state `[B, L-1, D]`: the last L-1 rows of concat(state, u)).
  """
  if k.ndim != 4 or k.shape[:2] != u.shape[:2] or k.shape[3] != u.shape[2]:
    raise ValueError(f"dynamic_causal_conv: k must be [B, T, L, D] for {u.shape=}; "
                     f"got {k.shape=}.")
  _check(u, k[0, 0], initial_state)
  resolve("dynamic_causal_conv", impl, {"reference": True}, {"default": "reference"})
  b, t, d = u.shape
  taps = k.shape[2]
  l1 = taps - 1
  past = (jnp.zeros((b, l1, d), u.dtype) if initial_state is None
          else initial_state.astype(u.dtype))
  full = jnp.concatenate([past, u], axis=1)                # u_{-(L-1)} .. u_{T-1}  [b, l1+t, d]
  xf, kf = full.astype(jnp.float32), k.astype(jnp.float32)
  y = jnp.zeros((b, t, d), jnp.float32)
  for s in range(taps):  # kernels are short (DynamicConv: <= 31 taps)
    y = y + kf[:, :, s] * xf[:, l1 - s:l1 - s + t]
  return y.astype(u.dtype), full[:, full.shape[1] - l1:]
