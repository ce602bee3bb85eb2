"""The gla-based mixers: parameterisation at init, direct-formula equivalence, config errors.

The protocol (causality, decoding, prefill, segments, gradients, lag-2 copy) is checked for every
registered mixer by tests/mixers/test_protocol.py. Here each mixer's output is recomputed from its
parameters with an independent plain formula (numpy quadratic forms, a complex scan for GateLoop,
the SSD recurrence token by token for Mamba2) in float64, at small shapes, without seqmix ops.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.common.lowrank import LowRank
from seqmix.mixers.linear import gateloop, gla, hgrn2, lightning, linear_transformer, mamba2, retnet
from seqmix.testing import RTOL, assert_rel_close

D = mt.D_MODEL
# The mixers run in float32 (chunked gla); the oracles below run in float64 from the same
# parameters, so the float32 tolerance applies.
TOL = RTOL["float32"]


def _setup(module, t=11, b=2, seed=0):
  """(x, params, y): float64 inputs and params for the oracle, the mixer's float32 output."""
  return mt.oracle_setup(module, t, b, seed)[:3]


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _rms(x, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _heads(a, h):
  return a.reshape(*a.shape[:-1], h, -1)  # [b, t, h, d/h]


# LowRank.


def test_lowrank_n_maps_equal_separate_low_rank_products():
  m = LowRank(features=6, rank=3, n=4, activation="tanh", use_bias=True,
              bias_init=nn.initializers.normal(1.0))
  x = mt.random_inputs(0, 2, 5, 8)
  p = nn.meta.unbox(jax.jit(m.init)(jax.random.key(0), x))["params"]
  y = np.asarray(jax.jit(m.apply)({"params": p}, x))
  a, b, c = (np.asarray(p[k], np.float64) for k in ("down", "up", "bias"))
  for i in range(4):
    want = np.tanh(np.asarray(x, np.float64) @ a[:, 3 * i:3 * i + 3]) @ b[i] + c[i]
    assert_rel_close(y[..., i, :], want, TOL, f"map {i}")


def test_lowrank_rejects_unknown_activation():
  with pytest.raises(ValueError, match="activation 'gelu2' unknown"):
    LowRank(features=4, rank=2, activation="gelu2").init(jax.random.key(0), jnp.ones((1, 3)))


# Linear Transformer.


def test_linear_transformer_equals_normalised_quadratic_form():
  m = linear_transformer.LinearTransformer(d_model=D, num_heads=2, chunk_size=4)
  x, p, y = _setup(m)
  proj = lambda n: x @ p[n]["kernel"] + p[n]["bias"]
  phi = lambda a: np.where(a > 0, a + 1.0, np.exp(a))
  q, k, v = (_heads(proj(n), 2) for n in ("q_proj", "k_proj", "v_proj"))
  q, k = phi(q), phi(k)
  t = x.shape[1]
  att = np.einsum("bthk,bshk->bhts", q, k) * np.tril(np.ones((t, t)))
  o = np.einsum("bhts,bshv->bthv", att, v) / (att.sum(-1).transpose(0, 2, 1)[..., None] + m.eps)
  want = o.reshape(*o.shape[:2], D) @ p["o_proj"]["kernel"] + p["o_proj"]["bias"]
  assert_rel_close(y, want, TOL, "linear transformer")


# RetNet.


def test_retnet_decays_are_the_papers():
  got = np.exp(np.asarray(retnet.retention_log_decays(4), np.float64))
  np.testing.assert_allclose(got, [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256], rtol=1e-6)


def _rotate64(a, pos):
  half = a.shape[-1] // 2
  theta = 1.0 / 10000.0 ** np.linspace(0.0, 1.0, half)
  z = (a[..., 0::2] + 1j * a[..., 1::2]) * np.exp(1j * pos[:, :, None, None] * theta)
  out = np.empty_like(a)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def test_retnet_equals_parallel_retention():
  m = retnet.RetNet(d_model=D, num_heads=2, chunk_size=4)
  x, p, y = _setup(m)
  b, t, _ = x.shape
  pos = np.broadcast_to(np.arange(t, dtype=np.float64), (b, t))
  q, k = (_rotate64(_heads(x @ p[n]["kernel"], 2), pos) for n in ("q_proj", "k_proj"))
  v = _heads(x @ p["v_proj"]["kernel"], 2)
  gamma = 1.0 - 2.0 ** (-5.0 - np.arange(2))
  n_m = np.arange(t)[:, None] - np.arange(t)[None, :]
  decay = np.where(n_m >= 0, gamma[:, None, None] ** np.maximum(n_m, 0), 0.0)  # [h, t, s]
  o = np.einsum("bthk,bshk,hts,bshv->bthv", q, k, decay, v) * (D // 2) ** -0.5
  o = (o - o.mean(-1, keepdims=True)) / np.sqrt(o.var(-1, keepdims=True) + m.norm_eps)
  o = _silu(x @ p["g_proj"]["kernel"]) * o.reshape(b, t, -1)
  assert_rel_close(y, o @ p["o_proj"]["kernel"], TOL, "retnet")


def test_retnet_depends_on_relative_positions_only():
  m = retnet.RetNet(d_model=D, num_heads=2)
  x = mt.random_inputs(0, 1, 9)
  p = mt.init_params(m, x)
  pos = jnp.arange(9, dtype=jnp.int32)[None]
  apply = jax.jit(lambda pos_: m.apply({"params": p}, x, positions=pos_)[0])
  y0, y1 = apply(pos), apply(pos + 37)
  assert_rel_close(y1, y0, 1e-5, "shifted positions")


# GLA.


def test_gla_gate_starts_near_one():
  """Log gates are logsigmoid(·)/16 <= 0: every decay in (0, 1), near 1 at init (paper: 16)."""
  m = gla.GLA(d_model=D, num_heads=2)
  x = mt.random_inputs(0, 2, 7)
  p = nn.meta.unbox(jax.jit(m.init)(jax.random.key(0), x))["params"]
  gk = p["gk_proj"]
  assert gk["down"].shape == (D, 16) and gk["up"].shape == (16, D // 2)
  logits = np.asarray(x) @ np.asarray(gk["down"]) @ np.asarray(gk["up"]) + np.asarray(gk["bias"])
  decay = np.exp(np.log(_sigmoid(logits)) / 16)
  assert decay.min() > 0.9 and decay.max() < 1.0, (decay.min(), decay.max())


def test_gla_equals_per_key_recurrence():
  m = gla.GLA(d_model=D, num_heads=2, chunk_size=4)
  x, p, y = _setup(m)
  q, k = (_heads(x @ p[n]["kernel"], 2) for n in ("q_proj", "k_proj"))
  v, gate = (_heads(x @ p[n]["kernel"], 2) for n in ("v_proj", "g_proj"))
  gk = p["gk_proj"]
  a = _heads(np.exp(np.log(_sigmoid(x @ gk["down"] @ gk["up"] + gk["bias"])) / 16), 2)
  s = np.zeros((x.shape[0], 2, q.shape[-1], v.shape[-1]))
  outs = []
  for t in range(x.shape[1]):
    s = a[:, t, :, :, None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
    outs.append(np.einsum("bhk,bhkv->bhv", q[:, t], s) * q.shape[-1] ** -0.5)
  o = np.stack(outs, 1)                                               # [b, t, h, v]
  o = _rms(o, m.norm_eps) * p["g_norm"]["scale"] * _silu(gate)
  assert_rel_close(y, o.reshape(*o.shape[:2], -1) @ p["o_proj"]["kernel"], TOL, "gla")


# Mamba2.


def test_mamba2_init_ranges():
  m = mamba2.Mamba2(d_model=D, d_state=16, headdim=8)
  p = nn.meta.unbox(jax.jit(m.init)(jax.random.key(0), jnp.ones((1, 3, D))))["params"]
  dt = np.asarray(jax.nn.softplus(p["dt_bias"]))
  a = -np.exp(np.asarray(p["A_log"]))
  assert dt.shape == a.shape == (8,)
  assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5), dt
  assert a.min() >= -16 and a.max() <= -1, a
  np.testing.assert_array_equal(np.asarray(p["D"]), 1.0)


@pytest.mark.parametrize("ngroups, norm_groups", [(1, None), (2, None), (2, 1)])
def test_mamba2_equals_ssd_recurrence(ngroups, norm_groups):
  """The whole layer in float64 numpy, the SSD recurrence token by token per head:
  h_t = exp(Δ_t A) h_{t−1} + Δ_t B_tᵀ x_t, y_t = C_t h_t + D x_t, with heads [g·H/G, (g+1)·H/G)
  reading B/C group g and the gated RMSNorm over each group's d_inner/G channels (over all
  d_inner channels with norm_groups=1, transformers' form). T = 20 crosses chunks of 8."""
  h, pd, n = 4, 16, 8                                                 # d_inner = 2·D = H·P
  m = mamba2.Mamba2(d_model=D, d_state=n, headdim=pd, ngroups=ngroups, chunk_size=8,
                    norm_groups=norm_groups)
  x, p, y = _setup(m, t=20)
  b, t, _ = x.shape
  d_inner, gn = h * pd, ngroups * n
  zxbcdt = x @ p["in_proj"]["kernel"]
  z, xbc, dt = np.split(zxbcdt, [d_inner, 2 * d_inner + 2 * gn], axis=-1)
  assert dt.shape[-1] == h
  ker = p["conv1d"]["kernel"]                                         # [L, C]: ker[0] on u_t
  xbc_pad = np.pad(xbc, ((0, 0), (ker.shape[0] - 1, 0), (0, 0)))
  conv = np.stack([sum(ker[s] * xbc_pad[:, i + ker.shape[0] - 1 - s]
                       for s in range(ker.shape[0])) for i in range(t)], 1)
  xbc = _silu(conv + p["conv1d"]["bias"])
  xs, bm, cm = np.split(xbc, [d_inner, d_inner + gn], axis=-1)
  xs = xs.reshape(b, t, h, pd)
  bm, cm = bm.reshape(b, t, ngroups, n), cm.reshape(b, t, ngroups, n)
  delta = np.logaddexp(0.0, dt + p["dt_bias"])                        # softplus  [b, t, h]
  a = -np.exp(p["A_log"])                                             # [h]
  out = np.zeros((b, t, h, pd))
  for hi in range(h):
    gi = hi // (h // ngroups)
    state = np.zeros((b, n, pd))
    for i in range(t):
      state = (np.exp(delta[:, i, hi] * a[hi])[:, None, None] * state
               + delta[:, i, hi, None, None] * bm[:, i, gi, :, None] * xs[:, i, hi, None, :])
      out[:, i, hi] = np.einsum("bn,bnp->bp", cm[:, i, gi], state) + p["D"][hi] * xs[:, i, hi]
  gated = (out.reshape(b, t, d_inner) * _silu(z)).reshape(b, t, norm_groups or ngroups, -1)
  normed = _rms(gated, m.norm_eps).reshape(b, t, d_inner) * p["norm"]["scale"]
  assert_rel_close(y, normed @ p["out_proj"]["kernel"], TOL, f"mamba2 G={ngroups} vs SSD")


# HGRN2.


def test_hgrn2_lower_bound_rises_with_depth():
  bounds = [hgrn2.forget_lower_bound(l, 4) for l in range(4)]
  assert bounds == [0.0, 0.25, 0.5, 0.75]
  with pytest.raises(ValueError, match="layer_idx=4 must be in"):
    hgrn2.forget_lower_bound(4, 4)


@pytest.mark.parametrize("layer_idx", [0, 2])
def test_hgrn2_equals_tied_gate_recurrence(layer_idx):
  m = hgrn2.HGRN2(d_model=D, expand_ratio=16, layer_idx=layer_idx, n_layers=3, chunk_size=4)
  x, p, y = _setup(m)
  lb = layer_idx / 3
  q = _heads(_silu(x @ p["q_proj"]["kernel"]), 2)
  f = _heads(lb + (1 - lb) * _sigmoid(x @ p["f_proj"]["kernel"]), 2)   # forget gate >= lb
  i = _heads(x @ p["i_proj"]["kernel"], 2)
  assert f.min() >= lb
  s = np.zeros((x.shape[0], 2, 16, 16))
  outs = []
  for t in range(x.shape[1]):
    s = f[:, t, :, :, None] * s + (1 - f[:, t, :, :, None]) * i[:, t, :, None, :]
    outs.append(np.einsum("bhk,bhkv->bhv", q[:, t], s) * 16 ** -0.5)
  o = np.stack(outs, 1).reshape(*x.shape[:2], D)
  o = _rms(o, m.norm_eps) * p["g_norm"]["scale"]
  assert_rel_close(y, o @ p["o_proj"]["kernel"], TOL, "hgrn2")


# Lightning (TransNormerLLM).


def test_lightning_decays_by_head_and_depth():
  np.testing.assert_allclose(lightning.alibi_slopes(8), 2.0 ** -np.arange(1.0, 9.0))
  six = lightning.alibi_slopes(6)  # not a power of two: ALiBi's interleaving
  np.testing.assert_allclose(six, [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
  # float64 exp: the last layer's λ = exp(-1e-5 · s_h) is 1 to float32 precision.
  log_lam = np.stack([np.asarray(lightning.lightning_log_decays(8, l, 4), np.float64)
                      for l in range(4)])
  assert np.all(log_lam < 0)
  lam = np.exp(log_lam)
  assert np.all(np.diff(lam, axis=0) > 0), "decays must weaken (λ grow) with depth"
  assert np.all(np.diff(lam, axis=1) > 0), "later heads decay more slowly"
  np.testing.assert_allclose(lam[0], np.exp(-(1 + 1e-5) * 2.0 ** -np.arange(1.0, 9.0)), rtol=1e-6)


def test_lightning_equals_decayed_quadratic_form():
  m = lightning.Lightning(d_model=D, num_heads=4, layer_idx=1, n_layers=3, chunk_size=4)
  x, p, y = _setup(m)
  t = x.shape[1]
  q, k, v, u = np.split(x @ p["qkvu_proj"]["kernel"], 4, axis=-1)
  q, k, v = _heads(_silu(q), 4), _heads(_silu(k), 4), _heads(v, 4)
  lam = np.exp(np.asarray(lightning.lightning_log_decays(4, 1, 3), np.float64))
  n_m = np.arange(t)[:, None] - np.arange(t)[None, :]
  decay = np.where(n_m >= 0, lam[:, None, None] ** np.maximum(n_m, 0), 0.0)
  o = np.einsum("bthk,bshk,hts,bshv->bthv", q, k, decay, v).reshape(*x.shape[:2], D)
  want = (_rms(o, m.norm_eps) * u) @ p["out_proj"]["kernel"]
  assert_rel_close(y, want, TOL, "lightning")


# GateLoop.


def _gateloop_complex_scan(m, x, p, segment_ids=None):
  """GateLoop's recurrence as written, in complex128: h_t = a_t h_{t-1} + k_tᵀ v_t."""
  h = m.num_heads
  q, k, v = (_heads(x @ p[n]["kernel"], h) for n in ("q_proj", "k_proj", "v_proj"))
  lin = lambda n: _heads(x @ p[n]["kernel"] + p[n]["bias"], h)
  a = _sigmoid(lin("magnitude_proj")) * np.exp(1j * lin("phase_proj"))   # [b, t, h, k]
  s = np.zeros(q.shape[:1] + (h, q.shape[-1], v.shape[-1]), np.complex128)
  outs = []
  for t in range(x.shape[1]):
    if segment_ids is not None and t > 0:
      s = s * (segment_ids[:, t] == segment_ids[:, t - 1])[:, None, None, None]
    s = a[:, t, :, :, None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
    outs.append(np.real(np.einsum("bhk,bhkv->bhv", q[:, t], s)) * q.shape[-1] ** -0.5)
  o = np.stack(outs, 1).reshape(x.shape)
  o = o * _silu(x @ p["g_proj"]["kernel"])
  return o @ p["o_proj"]["kernel"]


def test_gateloop_equals_complex_scan():
  m = gateloop.GateLoop(d_model=D, num_heads=2, chunk_size=4)
  x, p, y = _setup(m, t=13)
  assert_rel_close(y, _gateloop_complex_scan(m, x, p), TOL, "gateloop vs complex scan")


def test_gateloop_packed_equals_complex_scan_with_resets():
  m = gateloop.GateLoop(d_model=D, num_heads=2, chunk_size=4)
  x, p, _ = _setup(m, t=13)
  seg = np.repeat(np.array([[1] * 6 + [2] * 7]), 2, axis=0)
  y, _ = jax.jit(m.apply)({"params": jax.tree.map(jnp.asarray, p)}, jnp.asarray(x, jnp.float32),
                          segment_ids=jnp.asarray(seg, jnp.int32))
  assert_rel_close(y, _gateloop_complex_scan(m, x, p, seg), TOL, "gateloop packed")


# Configuration errors name the fields and a fix.


@pytest.mark.parametrize("module, match", [
    (gla.GLA(d_model=D, num_heads=3), r"key_dim \(d_model·expand_k\)=16 must be divisible by "
                                      r"num_heads=3"),
    (gla.GLA(d_model=D, gate_logit_normalizer=0.0), "gate_logit_normalizer=0.0 must be > 0"),
    (mamba2.Mamba2(d_model=D, headdim=24), r"d_inner \(expand·d_model\)=64 must be divisible by "
                                           r"headdim=24"),
    (mamba2.Mamba2(d_model=D, headdim=16, ngroups=3), "divisible by ngroups=3"),
    (mamba2.Mamba2(d_model=D, headdim=16, norm_groups=3), "divisible by norm_groups=3"),
    (mamba2.Mamba2(d_model=D, headdim=16, dt_min=0.2), "dt_min <= dt_max"),
    (hgrn2.HGRN2(d_model=D, expand_ratio=12), "d_model=32 must be divisible by expand_ratio=12"),
    (hgrn2.HGRN2(d_model=D, expand_ratio=16, layer_idx=2, n_layers=2), "layer_idx=2 must be in"),
    (retnet.RetNet(d_model=D, num_heads=16), "head key dim d_model/num_heads = 2 must be even"),
    (lightning.Lightning(d_model=D, num_heads=5), "d_model=32 must be divisible by num_heads=5"),
    (gateloop.GateLoop(d_model=D, num_heads=6), "num_heads=6"),
    (linear_transformer.LinearTransformer(d_model=D, num_heads=7), "num_heads=7"),
])
def test_bad_hyperparameters_raise_clear_errors(module, match):
  with pytest.raises(ValueError, match=match):
    module.init(jax.random.key(0), jnp.ones((1, 3, D)))


def test_unknown_impl_raises_naming_the_built_ones():
  # The mixer runs the impl its config names: an impl gla does not have reaches the op's error.
  m = gla.GLA(d_model=D, num_heads=2, impl="cudnn")
  with pytest.raises(ValueError, match="reference.*chunked.*pallas"):
    m.init(jax.random.key(0), jnp.ones((1, 3, D)))


def test_dims_match_the_papers():
  """RetNet: V = 2·K per head; GLA: K = D/2, V = D; Mamba2 defaults: P 64, N 128, expand 2."""
  c = retnet.RetNet(d_model=64, num_heads=4).init_cache(1, 8)
  assert c.state.shape == (1, 4, 16, 32)
  c = gla.GLA(d_model=64, num_heads=4).init_cache(1, 8)
  assert c.state.shape == (1, 4, 8, 16)
  c = mamba2.Mamba2(d_model=256).init_cache(1, 8)
  assert c.state.shape == (1, 8, 128, 64) and c.conv.inputs.shape == (1, 3, 2 * 256 + 2 * 128)
  assert math.isclose(float(jnp.exp(retnet.retention_log_decays(1)[0])), 1 - 2 ** -5, rel_tol=1e-6)
