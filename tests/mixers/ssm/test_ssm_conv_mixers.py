"""The convolution-family SSM mixers (S4, S4D, DSS, S5, H3, GSS): initialisation, direct
formulas, config errors.

The protocol (causality, decode == parallel, split prefill, segments, gradients, lag-2 copy) is
checked for every registered mixer by tests/mixers/test_protocol.py. Here each mixer's parallel
output is recomputed from its parameters by an independent plain formula in float64 numpy — the
continuous SSM discretised as the paper writes it, run as a token-by-token recurrence (dense for
S4) — at small shapes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.ssm import _common, dss, gss, h3, s4, s4d, s5
from seqmix.ops import ssm_kernels
from seqmix.testing import RTOL, assert_rel_close

# The mixers run in float32; the oracles run in float64 from the same parameters.
TOL = RTOL["float32"]
D = 8


def _setup(module, t=12, b=2, seed=0):
  """(x, params, y): float64 inputs and params for the oracle, the mixer's float32 output."""
  return mt.oracle_setup(module, t, b, seed)[:3]


def _cplx(pair):
  return pair[..., 0] + 1j * pair[..., 1]


def _gelu(x):  # jax.nn.gelu's default tanh approximation
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _dense(p, x):
  return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def _output(p, y, kind):
  z = _dense(p["out_proj"], y)
  if kind == "glu":
    f = y.shape[-1]
    return z[..., :f] * _sigmoid(z[..., f:])
  return y * _sigmoid(z) if kind == "half_glu" else z


def _diag_recurrence(u, a, b, c, step, disc):
  """Plain diagonal SSM per channel, conjugate pairs: u [B, T, H] -> 2 Re Σ_n C h [B, T, H]."""
  dt_a = step[:, None] * a                                             # [h, n]
  if disc == "zoh":
    a_bar, b_bar = np.exp(dt_a), (np.exp(dt_a) - 1.0) / a * b
  else:
    a_bar, b_bar = (1 + dt_a / 2) / (1 - dt_a / 2), step[:, None] * b / (1 - dt_a / 2)
  h = np.zeros(u.shape[:1] + a.shape, complex)
  ys = []
  for t in range(u.shape[1]):
    h = a_bar * h + b_bar * u[:, t, :, None]
    ys.append(2.0 * np.einsum("hn,bhn->bh", c, h).real)
  return np.stack(ys, 1)


def _diag_params(p, learn_b=True):
  a = -np.exp(p["log_a_re"]) + 1j * p["a_im"]
  b = _cplx(p["b"]) if learn_b else np.ones_like(a)
  return a, b, _cplx(p["c"]), np.exp(p["log_step"]), p["d"]


# Initialisation.


@pytest.mark.parametrize("init,expected", [("lin", ssm_kernels.s4d_lin),
                                           ("inv", ssm_kernels.s4d_inv)])
def test_s4d_init(init, expected):
  m = s4d.S4D(d_model=D, d_state=16, ssm_init=init)
  p = jax.tree.map(np.asarray, mt.init_params(m, zero_fill_std=0.0))["ssm"]
  a = -np.exp(p["log_a_re"]) + 1j * p["a_im"]
  np.testing.assert_allclose(a, np.broadcast_to(expected(16), (D, 8)), rtol=1e-6)
  np.testing.assert_allclose(_cplx(p["b"]), 1.0)
  assert np.all(p["log_step"] >= math.log(1e-3)) and np.all(p["log_step"] <= math.log(1e-1))
  assert p["log_step"].std() > 0.3  # log-uniform over a range of width log(100) ≈ 4.6


def test_s4_init_is_hippo_legs_dplr():
  m = s4.S4(d_model=D, d_state=8, l_max=16)
  p = jax.tree.map(np.asarray, mt.init_params(m, zero_fill_std=0.0))
  lam, pp, bb, _ = ssm_kernels.dplr_legs(8)
  np.testing.assert_allclose(-np.exp(p["log_lambda_re"]), np.broadcast_to(lam.real, (D, 4)),
                             rtol=1e-6)
  np.testing.assert_allclose(p["lambda_im"], np.broadcast_to(lam.imag, (D, 4)), rtol=1e-6)
  np.testing.assert_allclose(_cplx(p["p"]), np.broadcast_to(pp, (D, 4)), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_cplx(p["b"]), np.broadcast_to(bb, (D, 4)), rtol=1e-6, atol=1e-7)


def test_dss_init_is_skew_hippo_with_b_fixed():
  m = dss.DSS(d_model=D, d_state=8)
  p = jax.tree.map(np.asarray, mt.init_params(m, zero_fill_std=0.0))["ssm"]
  assert "b" not in p  # DSS-exp: W = C·B, B is not a parameter
  lam = ssm_kernels.dplr_legs(8)[0]
  np.testing.assert_allclose(-np.exp(p["log_a_re"]), -0.5, rtol=1e-6)
  np.testing.assert_allclose(p["a_im"], np.broadcast_to(lam.imag, (D, 4)), rtol=1e-6)


def test_s5_init_block_hippo_n():
  m = s5.S5(d_model=D, d_state=16, blocks=2)
  p = jax.tree.map(np.asarray, mt.init_params(m, zero_fill_std=0.0))
  lam, v = s5.hippo_n_blocks(16, 2)
  block = ssm_kernels.dplr_legs(8)[0]
  np.testing.assert_allclose(lam, np.concatenate([block, block]))
  np.testing.assert_allclose(p["lambda_re"], -0.5, rtol=1e-6)
  np.testing.assert_allclose(p["lambda_im"], lam.imag, rtol=1e-6)
  # B̃ = V⁻¹ B for a real block-diagonal-mapped B: 2 Re(V B̃) recovers B, and B̃'s first block
  # of states only sees B's first block of rows.
  bt = _cplx(p["b"])                                                    # [p', d]
  b_real = 2.0 * (v @ bt).real                                          # [p, d]
  np.testing.assert_allclose(v.conj().T @ b_real, bt, atol=1e-5)
  assert 0.1 < b_real.std() * math.sqrt(16) < 3.0                       # LecunNormal, fan-in P
  assert np.all(p["log_step"] >= math.log(1e-3)) and np.all(p["log_step"] <= math.log(1e-1))


def test_gss_dims():
  m = gss.GSS(d_model=16, d_state=8, expand=3)
  p = jax.tree.map(np.asarray, mt.init_params(m))
  assert p["gate_proj"]["kernel"].shape == (16, 48)
  assert p["ssm_in_proj"]["kernel"].shape == (16, 4)                    # d_ssm = d_model / 4
  assert p["dss"]["c"].shape == (4, 4, 2)
  assert p["out_proj"]["kernel"].shape == (48, 16)


# Direct formulas (float64 numpy recurrences vs the mixers' convolution / scan forms).


@pytest.mark.parametrize("init,disc", [("lin", "zoh"), ("inv", "bilinear")])
def test_s4d_matches_plain_recurrence(init, disc):
  m = s4d.S4D(d_model=D, d_state=8, ssm_init=init, disc=disc)
  x, p, y = _setup(m)
  a, b, c, step, skip = _diag_params(p["ssm"])
  pre = _diag_recurrence(x, a, b, c, step, disc) + skip * x
  assert_rel_close(y, _output(p["output"], _gelu(pre), "glu"), TOL, "s4d vs recurrence")


def test_dss_matches_dss_exp_kernel():
  m = dss.DSS(d_model=D, d_state=8, output="linear")
  x, p, y = _setup(m)
  a, _, w, step, skip = _diag_params(p["ssm"], learn_b=False)
  k = np.arange(x.shape[1])
  # DSS-exp: K_k = Re Σ_n W_n (e^{Λ_n Δ} - 1)/Λ_n e^{Λ_n k Δ}, over the N states (pairs: 2 Re).
  kern = 2.0 * np.einsum("hn,hnk->kh", w * (np.exp(a * step[:, None]) - 1) / a,
                         np.exp(a[:, :, None] * step[:, None, None] * k)).real   # [t, h]
  conv = np.stack([np.einsum("sh,bsh->bh", kern[:t + 1][::-1], x[:, :t + 1])
                   for t in range(x.shape[1])], 1)
  assert_rel_close(y, _output(p["output"], _gelu(conv + skip * x), "linear"), TOL,
                   "dss vs DSS-exp kernel")


def test_s4_matches_dense_bilinear_recurrence():
  m = s4.S4(d_model=D, d_state=8, l_max=20)
  x, p, y = _setup(m)
  lam = -np.exp(p["log_lambda_re"]) + 1j * p["lambda_im"]
  pp, bb, ct = _cplx(p["p"]), _cplx(p["b"]), _cplx(p["c"])
  full = lambda z: np.concatenate([z, z.conj()], -1)                    # the implied conjugates
  lam, pp, bb, ct = map(full, (lam, pp, bb, ct))
  step = np.exp(p["log_step"])
  pre = np.zeros_like(x)
  for h in range(D):
    a = np.diag(lam[h]) - np.outer(pp[h], pp[h].conj())
    eye = np.eye(8)
    back = np.linalg.inv(eye - step[h] / 2 * a)
    a_bar, b_bar = back @ (eye + step[h] / 2 * a), back @ (step[h] * bb[h])
    # S4's C̃ = C̄ (I - Ā^{l_max}).
    c_bar = np.linalg.solve((eye - np.linalg.matrix_power(a_bar, 20)).T, ct[h])
    state = np.zeros((x.shape[0], 8), complex)
    for t in range(x.shape[1]):
      state = state @ a_bar.T + x[:, t, h, None] * b_bar
      pre[:, t, h] = (state @ c_bar).real
  pre = pre + p["d"] * x
  assert_rel_close(y, _output(p["output"], _gelu(pre), "glu"), TOL, "s4 vs dense recurrence")


@pytest.mark.parametrize("disc", ["zoh", "bilinear"])
def test_s5_matches_plain_mimo_recurrence(disc):
  m = s5.S5(d_model=D, d_state=8, blocks=2, disc=disc)
  x, p, y = _setup(m)
  lam = np.minimum(p["lambda_re"], -1e-4) + 1j * p["lambda_im"]
  step = np.exp(p["log_step"])
  if disc == "zoh":
    a_bar = np.exp(lam * step)
    b_bar = ((a_bar - 1) / lam)[:, None] * _cplx(p["b"])
  else:
    a_bar = (1 + lam * step / 2) / (1 - lam * step / 2)
    b_bar = (step / (1 - lam * step / 2))[:, None] * _cplx(p["b"])
  c = _cplx(p["c"])
  state = np.zeros((x.shape[0], lam.shape[0]), complex)
  pre = []
  for t in range(x.shape[1]):
    state = a_bar * state + x[:, t] @ b_bar.T
    pre.append(2.0 * (state @ c.T).real + p["d"] * x[:, t])
  assert_rel_close(y, _output(p["output"], _gelu(np.stack(pre, 1)), "half_glu"), TOL,
                   "s5 vs MIMO recurrence")


def test_h3_matches_direct_formula():
  m = h3.H3(d_model=D, d_state=6, head_dim=4)
  x, p, y = _setup(m)
  hh, dh = 2, 4
  q, k, v = (_dense(p[n], x) for n in ("q_proj", "k_proj", "v_proj"))
  taps = p["shift_ssm"]["kernel"]                                       # [n, d], taps[0]: now
  k_sh = sum(taps[s] * np.pad(k, ((0, 0), (s, 0), (0, 0)))[:, :k.shape[1]]
             for s in range(taps.shape[0]))
  k = k_sh + p["shift_d"] * k
  a, b, c, step, skip = _diag_params(p["diag_ssm"])
  t_len = x.shape[1]
  kern = 2.0 * np.einsum("hn,hnl->lh", c * (np.exp(a * step[:, None]) - 1) / a * b,
                         np.exp(a[:, :, None] * step[:, None, None] * np.arange(t_len))).real
  kh, vh, qh = (z.reshape(*z.shape[:2], hh, dh) for z in (k, v, q))    # [b, t, h, d_h]
  o = np.zeros_like(qh)
  for t in range(t_len):
    s_t = sum(kern[t - s][None, :, None, None] * np.einsum("bhi,bhj->bhij", kh[:, s], vh[:, s])
              for s in range(t + 1))
    s_t = s_t + skip[None, :, None, None] * np.einsum("bhi,bhj->bhij", kh[:, t], vh[:, t])
    o[:, t] = np.einsum("bhi,bhij->bhj", qh[:, t], s_t)
  assert_rel_close(y, _dense(p["out_proj"], o.reshape(x.shape)), TOL, "h3 vs direct formula")


def test_gss_matches_direct_formula():
  m = gss.GSS(d_model=D, d_state=8, d_ssm=4, expand=2)
  x, p, y = _setup(m)
  v = _gelu(_dense(p["gate_proj"], x))
  u = _gelu(_dense(p["ssm_in_proj"], x))
  a, _, w, step, skip = _diag_params(p["dss"], learn_b=False)
  ssm_y = _diag_recurrence(u, a, np.ones_like(a), w, step, "zoh") + skip * u
  expect = _dense(p["out_proj"], _dense(p["ssm_out_proj"], ssm_y) * v)
  assert_rel_close(y, expect, TOL, "gss vs direct formula")


def test_diag_ssm_conv_and_recurrence_agree_with_columns():
  """The kernel form and the scan form of DiagSSM agree for E > 1 shared columns (H3's path)."""
  m = _common.DiagSSM(3, 6)
  u = mt.random_inputs(0, 2, 40, 3 * 5).reshape(2, 40, 3, 5)
  params = m.init(jax.random.key(0), u)
  y_conv, _ = m.apply(params, u)
  y_rec, h_last = m.apply(params, u, recurrent=True)
  assert h_last.shape == (2, 3, 3, 5)
  assert_rel_close(y_rec, y_conv, TOL, "recurrence vs convolution")


# Config errors.


@pytest.mark.parametrize("cls,kw,match", [
    (s4d.S4D, {"d_state": 0}, "d_state must be >= 1"),
    (s4d.S4D, {"d_state": 1}, "d_state=1 must be even"),
    (s4d.S4D, {"d_state": 7}, "d_state=7 must be even"),
    (s4d.S4D, {"ssm_init": "legs"}, "ssm_init='legs' is not one of"),
    (s4d.S4D, {"disc": "euler"}, "disc='euler' is not one of"),
    (s4d.S4D, {"dt_min": 0.2, "dt_max": 0.1}, "dt_min <= dt_max"),
    (s4.S4, {"d_state": 5}, "d_state=5 must be even"),
    (s4.S4, {"l_max": 0}, "l_max must be >= 1"),
    (dss.DSS, {"d_state": 3}, "d_state=3 must be even"),
    (s5.S5, {"d_state": 0}, "d_state must be >= 1"),
    (s5.S5, {"d_state": 12, "blocks": 4}, "blocks of an even size"),
    (h3.H3, {"head_dim": 3}, "divisible by head_dim=3"),
    (gss.GSS, {"d_ssm": 0}, "d_ssm must be >= 1"),
    (s4d.S4D, {"output": "relu"}, "output='relu' is not one of"),
])
def test_bad_hyperparameters_raise(cls, kw, match):
  m = cls(d_model=D, **kw)
  with pytest.raises(ValueError, match=match):
    m.init(jax.random.key(0), jnp.zeros((1, 4, D)))


def test_s4_sequence_longer_than_l_max_raises():
  m = s4.S4(d_model=D, d_state=4, l_max=8)
  with pytest.raises(ValueError, match="T=9 exceeds l_max=8.*set l_max >= 9"):
    m.init(jax.random.key(0), jnp.zeros((1, 9, D)))


def test_init_cache_shapes():
  assert s4.S4(d_model=D, d_state=8).init_cache(3, 10).state.shape == (3, D, 8)
  assert s4d.S4D(d_model=D, d_state=8).init_cache(3, 10).state.shape == (3, D, 4, 1)
  assert s5.S5(d_model=D, d_state=8).init_cache(3, 10).state.shape == (3, 4)
  c = h3.H3(d_model=D, d_state=6, head_dim=4).init_cache(3, 10)
  assert c.state.shape == (3, 2, 3, 16) and c.shift.inputs.shape == (3, 5, D)
  assert gss.GSS(d_model=D, d_state=8).init_cache(3, 10).state.shape == (3, 2, 4, 1)


# bfloat16 compute: the convolution and the scan accumulate in float32, so only the inputs' and
# projections' rounding remains (the default bfloat16 tolerance). Two mixers by default, all
# six under `slow`.
_BF16_SAMPLE = ("s4d", "h3")


@pytest.mark.parametrize("name", [
    n if n in _BF16_SAMPLE else pytest.param(n, marks=pytest.mark.slow)
    for n in ("s4", "s4d", "dss", "gss", "h3", "s5")])
def test_bfloat16_close_to_float32(name):
  m32, m16 = mt.build(name), mt.build(name, dtype=jnp.bfloat16)
  x = mt.random_inputs(0, 2, 16)
  params = mt.init_params(m32, x)
  y32, _ = jax.jit(m32.apply)({"params": params}, x)
  y16, _ = jax.jit(m16.apply)({"params": params}, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  assert_rel_close(y16.astype(jnp.float32), y32, RTOL["bfloat16"], f"{name} bf16 vs f32")
