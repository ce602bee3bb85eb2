"""Mamba and LRU: parameterisation at init, direct-formula equivalence, config errors.

The protocol (causality, decoding, prefill, segments, gradients, lag-2 copy) is checked for every
registered mixer by tests/mixers/test_protocol.py. Here each mixer's output is recomputed from its
parameters by a plain token-by-token numpy recurrence in float64 (with document resets, which for
Mamba checks the reset-through-Δ construction against an explicit h = 0).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.ssm import lru, mamba
from seqmix.testing import RTOL, assert_rel_close

D = mt.D_MODEL
# The mixers run in float32; the oracles run in float64 from the same parameters.
TOL = RTOL["float32"]


def _run(module, t=11, b=2, seed=0, segment_ids=None):
  """(x, params, y): float64 inputs and params for the oracle, the mixer's float32 output."""
  return mt.oracle_setup(module, t, b, seed, segment_ids)[:3]


def _init(module, d, seed=0):
  """The module's own init (no zero-leaf filling), jitted."""
  return nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, 2, d)))["params"])


def _silu(v):
  return v / (1.0 + np.exp(-v))


def _softplus(v):
  return np.logaddexp(v, 0.0)


def _starts(seg, t, b):
  if seg is None:
    return np.zeros((b, t), bool)
  seg = np.asarray(seg)
  s = np.ones((b, t), bool)
  s[:, 1:] = seg[:, 1:] != seg[:, :-1]
  return s


def _short_conv(u, kernel, bias, seg):
  """u [B, T, C], kernel [L, C] (kernel[0] on the current token), taps masked across documents."""
  b, t, _ = u.shape
  seg = np.zeros((b, t), int) if seg is None else np.asarray(seg)
  y = np.zeros_like(u)
  for i in range(t):
    for s in range(kernel.shape[0]):
      if i - s >= 0:
        same = (seg[:, i - s] == seg[:, i])[:, None]
        y[:, i] += np.where(same, kernel[s] * u[:, i - s], 0.0)
  return y + bias


# Mamba.


def _mamba_oracle(x, p, m, seg):
  b, t, _ = x.shape
  d_inner, rank = m.expand * m.d_model, math.ceil(m.d_model / 16)
  n = m.d_state
  xz = x @ p["in_proj"]["kernel"]
  xs, z = xz[..., :d_inner], xz[..., d_inner:]
  xs = _silu(_short_conv(xs, p["conv1d"]["kernel"], p["conv1d"]["bias"], seg))
  dbl = xs @ p["x_proj"]["kernel"]
  dt, bm, cm = dbl[..., :rank], dbl[..., rank:rank + n], dbl[..., rank + n:]
  if m.bcdt_rms_eps is not None:  # Falcon-Mamba's weightless RMSNorms
    rms = lambda v: v / np.sqrt(np.mean(v ** 2, -1, keepdims=True) + m.bcdt_rms_eps)
    dt, bm, cm = rms(dt), rms(bm), rms(cm)
  delta = _softplus(dt @ p["dt_proj"] + p["dt_bias"])                   # [b, t, e·d]
  a = -np.exp(p["A_log"])                                                # [e·d, n]
  starts = _starts(seg, t, b)
  h = np.zeros((b, d_inner, n))
  ys = []
  for i in range(t):
    h = np.where(starts[:, i, None, None], 0.0, h)
    h = np.exp(delta[:, i, :, None] * a) * h + (delta[:, i] * xs[:, i])[..., None] * bm[:, i, None]
    ys.append(np.einsum("bdn,bn->bd", h, cm[:, i]) + p["D"] * xs[:, i])
  y = np.stack(ys, 1) * _silu(z)
  return y @ p["out_proj"]["kernel"]


@pytest.mark.parametrize("packed, bcdt_rms_eps", [(False, None), (True, None), (False, 1e-5)])
def test_mamba_matches_direct_recurrence(packed, bcdt_rms_eps):
  m = mamba.Mamba(d_model=D, d_state=4, expand=2, bcdt_rms_eps=bcdt_rms_eps)
  seg = np.array([[0] * 4 + [1] * 7, [0] * 9 + [1] * 2], np.int32) if packed else None
  x, p, y = _run(m, segment_ids=seg)
  assert_rel_close(y, _mamba_oracle(x, p, m, seg), TOL, "mamba vs direct recurrence")


def test_mamba_init():
  m = mamba.Mamba(d_model=64, d_state=16, expand=2, n_layers=4)
  p = _init(m, 64)
  d_inner, rank = 128, 4
  a_log = np.asarray(p["A_log"])
  np.testing.assert_allclose(a_log, np.broadcast_to(np.log(np.arange(1, 17)), (d_inner, 16)),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(p["D"]), 1.0)
  dt0 = _softplus(np.asarray(p["dt_bias"], np.float64))
  assert dt0.min() >= 1e-3 * (1 - 1e-5) and dt0.max() <= 1e-1 * (1 + 1e-5)
  # LogUniform: log Δ₀ spread over [log 1e-3, log 1e-1] (128 draws: the mean is within 0.3).
  assert abs(np.log(dt0).mean() - math.log(1e-2)) < 0.3
  assert p["dt_proj"].shape == (rank, d_inner)
  assert np.abs(np.asarray(p["dt_proj"])).max() <= rank ** -0.5
  bound_out = (d_inner * 4) ** -0.5             # U(±1/√fan_in) / √n_layers
  assert np.abs(np.asarray(p["out_proj"]["kernel"])).max() <= bound_out
  assert np.abs(np.asarray(p["out_proj"]["kernel"])).max() > 0.9 * bound_out


@pytest.mark.parametrize("kwargs, match", [
    ({"d_state": 0}, "d_state=0"),
    ({"expand": 0}, "expand=0"),
    ({"dt_rank": 0}, "dt_rank=0"),
    ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min <= dt_max"),
    ({"dt_init": "zeros"}, "dt_init"),
])
def test_mamba_config_errors(kwargs, match):
  m = mamba.Mamba(d_model=D, **kwargs)
  with pytest.raises(ValueError, match=match):
    m.init_cache(1, 4)


# LRU.


def _lru_oracle(x, p, seg):
  b, t, d = x.shape
  nu, theta, gamma = np.exp(p["nu_log"]), np.exp(p["theta_log"]), np.exp(p["gamma_log"])
  lam = np.exp(-nu + 1j * theta)
  bm = p["B"][..., 0] + 1j * p["B"][..., 1]                              # [n, d]
  cm = p["C"][..., 0] + 1j * p["C"][..., 1]                              # [d, n]
  starts = _starts(seg, t, b)
  h = np.zeros((b, lam.shape[0]), complex)
  ys = []
  for i in range(t):
    h = np.where(starts[:, i, None], 0.0, lam * h) + gamma * (x[:, i] @ bm.T)
    ys.append((h @ cm.T).real + p["D"] * x[:, i])
  return np.stack(ys, 1)


@pytest.mark.parametrize("packed", [False, True])
def test_lru_matches_direct_recurrence(packed):
  m = lru.LRU(d_model=D, d_state=8)
  seg = np.array([[3] * 6 + [4] * 5, [0] * 2 + [1] * 9], np.int32) if packed else None
  x, p, y = _run(m, segment_ids=seg)
  assert_rel_close(y, _lru_oracle(x, p, seg), TOL, "lru vs direct recurrence")


def test_lru_init_ring_and_normaliser():
  m = lru.LRU(d_model=D, d_state=512, r_min=0.4, r_max=0.8, max_phase=math.pi / 10)
  p = _init(m, D, seed=1)
  mod = np.exp(-np.exp(np.asarray(p["nu_log"], np.float64)))
  phase = np.exp(np.asarray(p["theta_log"], np.float64))
  assert mod.min() >= 0.4 - 1e-6 and mod.max() <= 0.8 + 1e-6
  # Uniform by area: |λ|² ~ U(0.16, 0.64), mean 0.40 (512 draws: sd of the mean ≈ 0.006).
  assert abs((mod ** 2).mean() - 0.40) < 0.03
  assert phase.min() >= 0 and phase.max() <= math.pi / 10 + 1e-6
  np.testing.assert_allclose(np.exp(np.asarray(p["gamma_log"], np.float64)),
                             np.sqrt(1 - mod ** 2), rtol=1e-5)
  b_std = np.asarray(p["B"]).std()                # parts N(0, 1/(2D))
  assert abs(b_std - (2 * D) ** -0.5) < 0.1 * (2 * D) ** -0.5


@pytest.mark.parametrize("kwargs, match", [
    ({"d_state": 0}, "d_state=0"),
    ({"r_min": 0.9, "r_max": 0.5}, "r_min < r_max"),
    ({"r_max": 1.5}, "r_max <= 1"),
    ({"max_phase": 0.0}, "max_phase"),
])
def test_lru_config_errors(kwargs, match):
  m = lru.LRU(d_model=D, **kwargs)
  with pytest.raises(ValueError, match=match):
    m.init_cache(1, 4)
