"""RWKV-4 and sLSTM mixers, and the xLSTM[7:1] pattern: the official initialisations, each
mixer against a float64 NumPy transcription of its formulas, the packed-document path, and
configuration errors. (Causality, decoding, prefill, segments and gradients are the shared
protocol tests in tests/mixers/test_protocol.py.)"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import registry
from seqmix.mixers import testing as mt
from seqmix.mixers.rnn import rwkv4 as rwkv4_mod
from seqmix.mixers.rnn import slstm as slstm_mod
from seqmix.testing import assert_rel_close

D = mt.D_MODEL


def _init(module, seed=0):
  return mt.init_params(module, seed=seed)


def _params64(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


# RWKV-4.


@pytest.mark.parametrize("layer,n_layers", [(0, 1), (2, 4)])
def test_rwkv4_init_matches_official_schedules(layer, n_layers):
  m = rwkv4_mod.RWKV4(d_model=D, layer_idx=layer, n_layers=n_layers)
  p = nn.meta.unbox(jax.jit(m.init)(jax.random.key(0), mt.random_inputs(0, 1, 3))["params"])
  p = jax.tree.map(np.asarray, p)
  r0 = layer / (n_layers - 1) if n_layers > 1 else 0.0
  r1 = 1.0 - layer / n_layers
  c = np.arange(D)
  np.testing.assert_allclose(p["time_decay"], -5 + 8 * (c / (D - 1)) ** (0.7 + 1.3 * r0),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(p["time_first"], math.log(0.3) + 0.5 * ((c + 1) % 3 - 1),
                             rtol=1e-6)
  ramp = c / D
  np.testing.assert_allclose(p["time_mix_k"], ramp ** r1, rtol=1e-6)
  np.testing.assert_allclose(p["time_mix_v"], ramp ** r1 + 0.3 * r0, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(p["time_mix_r"], ramp ** (0.5 * r1), rtol=1e-6)
  for zero in ("key", "receptance", "output"):
    assert not np.any(p[zero]["kernel"]), f"{zero} should start at 0 (official scale_init=0)"
  w = p["value"]["kernel"]
  np.testing.assert_allclose(w.T @ w, np.eye(D), atol=1e-5)  # orthogonal value


def test_rwkv4_decay_slows_with_depth():
  """time_decay ends at −5 and 3 at every depth; in between it falls with depth (the exponent
  0.7 + 1.3 r0 rises), so w = −exp(time_decay) is weaker: deeper layers remember longer."""
  dec = [np.asarray(rwkv4_mod.time_decay_init(D, i, 4)) for i in range(4)]
  for d in dec:
    assert d[0] == pytest.approx(-5.0) and d[-1] == pytest.approx(3.0)
  mid = [d[D // 2] for d in dec]
  assert all(a > b for a, b in zip(mid, mid[1:])), mid


def _rwkv4_direct(p, x):
  """float64 RWKV-4 time mix of x [B,T,D] straight from the paper's sums (no stabiliser)."""
  x = np.asarray(x, np.float64)
  xp = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
  mix = lambda mu: x * mu + xp * (1 - mu)
  k = mix(p["time_mix_k"]) @ p["key"]["kernel"]
  v = mix(p["time_mix_v"]) @ p["value"]["kernel"]
  r = mix(p["time_mix_r"]) @ p["receptance"]["kernel"]
  w, u = -np.exp(p["time_decay"]), p["time_first"]
  t = x.shape[1]
  out = np.zeros_like(v)
  for j in range(t):
    num = np.exp(u + k[:, j]) * v[:, j]
    den = np.exp(u + k[:, j])
    for i in range(j):
      e = np.exp((j - 1 - i) * w + k[:, i])
      num, den = num + e * v[:, i], den + e
    out[:, j] = num / den
  return (1 / (1 + np.exp(-r)) * out) @ p["output"]["kernel"]


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_rwkv4_matches_direct_formula(impl):
  m = rwkv4_mod.RWKV4(d_model=D, layer_idx=1, n_layers=3, impl=impl, chunk_size=4)
  x = mt.random_inputs(1, 2, 11)
  p = mt.random_params(m, x, std=0.3)
  y, _ = jax.jit(m.apply)({"params": p}, x)
  assert_rel_close(y, _rwkv4_direct(_params64(p), x), 1e-5, "rwkv4 vs direct")


@pytest.mark.parametrize("name", ["rwkv4", "slstm"])
def test_one_document_segment_path_equals_plain_path(name):
  """segment_ids of one document take the per-token reset path; it must equal the plain op."""
  m = mt.build(name)
  x = mt.random_inputs(2, 2, 9)
  p = _init(m)
  y, _ = m.apply({"params": p}, x)
  y_seg, _ = m.apply({"params": p}, x, segment_ids=jnp.full((2, 9), 7, jnp.int32))
  assert_rel_close(y_seg, y, 1e-5, f"{name}: one-document segment path vs plain")


def test_rwkv4_bad_config_errors():
  x = mt.random_inputs(0, 1, 3)
  with pytest.raises(ValueError, match="dim_att=-1"):
    rwkv4_mod.RWKV4(d_model=D, dim_att=-1).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="layer_idx=3 must be in"):
    rwkv4_mod.RWKV4(d_model=D, layer_idx=3, n_layers=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="chunk_size=0"):
    rwkv4_mod.RWKV4(d_model=D, chunk_size=0).init_cache(1, 4)


# sLSTM.


@pytest.mark.parametrize("layer,n_layers", [(0, 1), (1, 3)])
def test_slstm_init_matches_official(layer, n_layers):
  dh = D // 4
  m = slstm_mod.SLSTM(d_model=D, num_heads=4, layer_idx=layer, n_layers=n_layers)
  p = nn.meta.unbox(jax.jit(m.init)(jax.random.key(0), mt.random_inputs(0, 1, 3))["params"])
  r0 = layer / (n_layers - 1) if n_layers > 1 else 0.0
  expected_f = 5.0 - 12.0 * (np.arange(dh) / (dh - 1)) ** (0.3 + 1.3 * r0)
  bias = np.asarray(p["bias"])                                  # [4 (z,i,f,o), h, dh]
  np.testing.assert_allclose(bias[2], np.broadcast_to(expected_f, (4, dh)), rtol=1e-6,
                             atol=1e-6)
  assert not np.any(bias[[0, 1, 3]]), "z, i, o biases start at 0"
  assert not np.any(np.asarray(p["recurrent"])), "recurrent weights start at 0 (official)"
  np.testing.assert_array_equal(np.asarray(p["norm_scale"]), 1.0)
  # small init: std sqrt(2 / (5 D)); the std of 512 draws has relative sd 1/sqrt(2·512) ≈ 3%,
  # so 15% is ~5 sd.
  w = np.asarray(p["w_zo"])
  assert abs(w.std() / math.sqrt(2 / (5 * D)) - 1) < 0.15


def test_slstm_forget_bias_spans_5_to_minus_7():
  for layer in (0, 2):
    f = np.asarray(slstm_mod.forget_bias_init(8, layer, 3))
    assert f[0] == pytest.approx(5.0) and f[-1] == pytest.approx(-7.0)
  # Deeper layers keep more memory: the exponent rises, so inner channels' biases rise.
  deep, shallow = (np.asarray(slstm_mod.forget_bias_init(8, i, 3)) for i in (2, 0))
  assert np.all(deep[1:-1] > shallow[1:-1])


def _slstm_direct(p, x, nh, eps=1e-5):
  """float64 sLSTM layer without conv (conv_kernel=0), unstabilised exp gates, sigmoid forget."""
  x = np.asarray(x, np.float64)
  b, t, d = x.shape
  dh = d // nh
  xh = x.reshape(b, t, nh, dh)
  g_if = np.einsum("bthd,ghde->btghe", xh, p["w_if"])
  g_zo = np.einsum("bthd,ghde->btghe", xh, p["w_zo"])
  pre = {"z": g_zo[:, :, 0], "i": g_if[:, :, 0], "f": g_if[:, :, 1], "o": g_zo[:, :, 1]}
  order = "zifo"
  c = np.zeros((b, nh, dh))
  n = np.zeros((b, nh, dh))
  h = np.zeros((b, nh, dh))
  out = np.zeros((b, t, nh, dh))
  sig = lambda a: 1 / (1 + np.exp(-a))
  for s in range(t):
    raw = {g: pre[g][:, s] + np.einsum("bhd,hde->bhe", h, p["recurrent"][j]) + p["bias"][j]
           for j, g in enumerate(order)}
    c = sig(raw["f"]) * c + np.exp(raw["i"]) * np.tanh(raw["z"])
    n = sig(raw["f"]) * n + np.exp(raw["i"])
    h = sig(raw["o"]) * c / n
    out[:, s] = h
  mu = out.mean(-1, keepdims=True)
  var = ((out - mu) ** 2).mean(-1, keepdims=True)
  return ((out - mu) / np.sqrt(var + eps) * p["norm_scale"]).reshape(b, t, d)


def test_slstm_matches_direct_formula():
  m = slstm_mod.SLSTM(d_model=D, num_heads=4, conv_kernel=0)
  x = mt.random_inputs(3, 2, 10)
  p = mt.random_params(m, x, std=0.3)   # nonzero R: the recurrence and gate order are exercised
  y, _ = jax.jit(m.apply)({"params": p}, x)
  assert_rel_close(y, _slstm_direct(_params64(p), x, 4), 1e-5, "slstm vs direct")


def test_slstm_conv_feeds_only_input_and_forget_gates():
  """Perturbing the conv weights changes the output only through i and f: with i and f
  projections zero, the conv has no effect."""
  m = slstm_mod.SLSTM(d_model=D, num_heads=4)
  x = mt.random_inputs(4, 1, 6)
  p = mt.random_params(m, x, std=0.3)
  p = {**p, "w_if": jnp.zeros_like(p["w_if"])}
  p2 = {**p, "conv": jax.tree.map(lambda a: a + 1.0, p["conv"])}
  y1, _ = m.apply({"params": p}, x)
  y2, _ = m.apply({"params": p2}, x)
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


def test_slstm_bad_config_errors():
  x = mt.random_inputs(0, 1, 3)
  with pytest.raises(ValueError, match="d_model=32 must be divisible by num_heads=5"):
    slstm_mod.SLSTM(d_model=D, num_heads=5).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="forget_gate='tanh'"):
    slstm_mod.SLSTM(d_model=D, forget_gate="tanh").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="conv_kernel=-1"):
    slstm_mod.SLSTM(d_model=D, conv_kernel=-1).init_cache(1, 4)


def test_slstm_without_conv_decodes():
  m = slstm_mod.SLSTM(d_model=D, num_heads=2, conv_kernel=0)
  runner = mt.Runner(m, _init(m))
  mt.check_decode_matches_parallel(runner, mt.random_inputs(5, 2, 7))


# xLSTM[7:1].


def test_xlstm_pattern_is_seven_mlstm_to_one_slstm():
  info = registry.get("xlstm")
  assert info.pattern == ("mlstm",) * 7 + ("slstm",)
  layers = registry.expand_pattern("xlstm", 16)
  assert layers.count("slstm") == 2 and layers[7] == layers[15] == "slstm"
