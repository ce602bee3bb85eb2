"""RWKV-6 (and its channel mix), mLSTM, DeltaNet, Gated DeltaNet: init schedules, float64 direct
formulas, config errors.

The protocol (causality, decoding, prefill, segments, gradients, lag-2 copy) is checked for every
registered mixer by tests/mixers/test_protocol.py. Here each mixer's output is recomputed from its
parameters by a plain token-by-token numpy recurrence in float64 (independent of the ops' scan
and chunked forms), at small shapes. The channel mix is not a registered mixer, so its decoding
and document resets are checked here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.common.rwkv_channel_mix import RWKVChannelMix, rwkv_hidden
from seqmix.mixers.linear import deltanet, gated_deltanet, mlstm, rwkv6
from seqmix.testing import RTOL, assert_rel_close

D = mt.D_MODEL
# Mixers run in float32 (chunked ops); the oracles run in float64 from the same parameters.
TOL = RTOL["float32"]


def _setup(module, t=11, b=2, seed=0):
  """(x, params, y): float64 inputs and params for the oracle, the mixer's float32 output."""
  return mt.oracle_setup(module, t, b, seed)[:3]


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _silu(x):
  return x * _sigmoid(x)


def _shift(x):
  return np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def _layer_norm(x, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def _rms(x, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _conv_silu(u, kernel, bias=None):
  """Causal depthwise conv, kernel[0] on the current token; u [B, T, C]."""
  y = sum(kernel[s] * np.pad(u, ((0, 0), (s, 0), (0, 0)))[:, :u.shape[1]]
          for s in range(kernel.shape[0]))
  return _silu(y if bias is None else y + bias)


def _init(module, seed=0):
  x = mt.random_inputs(seed, 1, 4, module.d_model)
  return jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed),
                                                                       x)["params"]))


# RWKV-6.


def test_rwkv6_init_follows_the_rwkv_lm_schedules():
  n_layers = 4
  first, last = (_init(rwkv6.RWKV6(d_model=D, head_size=8, layer_idx=i, n_layers=n_layers))
                 for i in (0, n_layers - 1))
  n = np.arange(D) / (D - 1)
  np.testing.assert_allclose(first["time_decay"], -6 + 5 * n ** 0.7, rtol=1e-6)
  np.testing.assert_allclose(last["time_decay"], -6 + 5 * n ** 2.0, rtol=1e-6)
  # Per-step decays exp(-exp(d)) within [exp(-e^-1), exp(-e^-6)] ~ [0.69, 0.9975].
  # The exponent 0.7 + 1.3 r0 grows with depth, so n^p shrinks and every channel of a deeper
  # layer decays at least as slowly (longer memory).
  assert np.all(last["time_decay"] <= first["time_decay"] + 1e-6)
  decay = np.exp(-np.exp(first["time_decay"]))
  assert decay.min() > 0.69 and decay.max() < 0.998
  u0 = ((np.arange(D) + 1) % 3 - 1) * 0.1
  np.testing.assert_allclose(first["time_faaaa"].ravel(), u0, atol=1e-7)
  np.testing.assert_allclose(last["time_faaaa"].ravel(), (1 - n) + u0, atol=1e-6)
  ddd = np.arange(D) / D
  np.testing.assert_allclose(first["time_maa_x"], 1 - ddd, atol=1e-6)
  r1 = 1 - (n_layers - 1) / n_layers
  np.testing.assert_allclose(last["time_maa"][2], 1 - (ddd ** r1 + 0.3), atol=1e-6)  # μ_v
  np.testing.assert_allclose(last["time_maa"][3], 1 - ddd ** (0.5 * r1), atol=1e-6)  # μ_r
  # LoRAs start as the identity of their base value; the output projection starts at zero.
  for lora in ("time_maa_lora", "time_decay_lora"):
    assert not np.any(first[lora]["down"]) and 0 < np.abs(first[lora]["up"]).max() <= 0.01
  assert not np.any(first["output"]["kernel"])
  # Orthogonal r (gain 1) and k (gain 0.1).
  np.testing.assert_allclose(first["receptance"]["kernel"].T @ first["receptance"]["kernel"],
                             np.eye(D), atol=1e-5)
  np.testing.assert_allclose(first["key"]["kernel"].T @ first["key"]["kernel"], 0.01 * np.eye(D),
                             atol=1e-6)


def test_rwkv6_equals_direct_recurrence():
  m = rwkv6.RWKV6(d_model=D, head_size=8, mix_lora_rank=4, decay_lora_rank=4, chunk_size=4,
                  layer_idx=1, n_layers=3)
  x, p, y = _setup(m)
  b, t, _ = x.shape
  h, k = D // 8, 8
  xx = _shift(x) - x
  lora_in = np.tanh((x + xx * p["time_maa_x"]) @ p["time_maa_lora"]["down"])  # [b, t, 5·r]
  lora = np.einsum("btnr,nrd->btnd", lora_in.reshape(b, t, 5, -1), p["time_maa_lora"]["up"])
  mixed = x[:, :, None] + xx[:, :, None] * (p["time_maa"] + lora)
  xw, xk, xv, xr, xg = (mixed[:, :, i] for i in range(5))
  r, kk, v = (z @ p[n]["kernel"] for z, n in ((xr, "receptance"), (xk, "key"), (xv, "value")))
  g = _silu(xg @ p["gate"]["kernel"])
  w = np.exp(-np.exp(p["time_decay"] + np.tanh(xw @ p["time_decay_lora"]["down"])
                     @ p["time_decay_lora"]["up"]))
  r, kk, v, w = (a.reshape(b, t, h, k) for a in (r, kk, v, w))
  u = p["time_faaaa"]
  s = np.zeros((b, h, k, k))
  o = np.zeros((b, t, h, k))
  for i in range(t):
    kv = kk[:, i, :, :, None] * v[:, i, :, None, :]                       # [b, h, k, v]
    o[:, i] = np.einsum("bhk,bhkv->bhv", r[:, i], s + u[None, :, :, None] * kv)
    s = w[:, i, :, :, None] * s + kv
  o = _layer_norm(o, rwkv6.GROUP_NORM_EPS).reshape(b, t, D) * p["ln_x"]["scale"] + p["ln_x"]["bias"]
  want = (o * g) @ p["output"]["kernel"]
  assert_rel_close(y, want, TOL, "rwkv6 vs direct")


def test_rwkv6_rejects_bad_head_size_and_depth():
  x = jnp.ones((1, 3, D))
  with pytest.raises(ValueError, match="d_model=32 must be divisible by head_size=12"):
    rwkv6.RWKV6(d_model=D, head_size=12).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="layer_idx=3 must be in"):
    rwkv6.RWKV6(d_model=D, head_size=8, layer_idx=3, n_layers=3).init(jax.random.key(0), x)


# RWKV-6 channel mix (a stateful MLP: not in the registry, so its protocol is checked here).


def _channel_mix():
  m = RWKVChannelMix(hidden=rwkv_hidden(D) // 2, d_model=D, layer_idx=1, n_layers=2)
  x = mt.random_inputs(0, 2, 9, D)
  p = mt.init_params(m, x)
  return m, p, x


def test_channel_mix_equals_formula_and_init():
  m, p, x = _channel_mix()
  init = _init(m)
  assert not np.any(init["value"]["kernel"]) and not np.any(init["receptance"]["kernel"])
  np.testing.assert_allclose(init["time_maa_k"], 1 - (np.arange(D) / D) ** 0.5, atol=1e-6)
  y, cache = jax.jit(m.apply)({"params": p}, x)
  assert cache is None
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x64 = np.asarray(x, np.float64)
  xx = _shift(x64) - x64
  kk = np.maximum((x64 + xx * p64["time_maa_k"]) @ p64["key"]["kernel"], 0) ** 2
  want = _sigmoid((x64 + xx * p64["time_maa_r"]) @ p64["receptance"]["kernel"]) * (
      kk @ p64["value"]["kernel"])
  assert_rel_close(y, want, TOL, "channel mix vs formula")
  assert rwkv_hidden(768) == 2688


def test_channel_mix_decode_and_documents():
  m, p, x = _channel_mix()
  run = jax.jit(lambda x_, c, s: m.apply({"params": p}, x_, cache=c, segment_ids=s))
  y_par, _ = run(x, None, None)
  cache = m.init_cache(2, 9)
  ys = []
  for i in range(9):
    y_i, cache = run(x[:, i:i + 1], cache, None)
    ys.append(y_i)
  assert_rel_close(jnp.concatenate(ys, 1), y_par, TOL, "channel mix decode vs parallel")
  seg, _ = mt.packed_pair(x, 4)
  y_seg, _ = run(x, None, seg)
  assert_rel_close(y_seg[:, 4:], run(x[:, 4:], None, None)[0], TOL, "packed doc 2 vs alone")
  cache, ys = m.init_cache(2, 9), []
  for i in range(9):
    y_i, cache = run(x[:, i:i + 1], cache, seg[:, i:i + 1])
    ys.append(y_i)
  assert_rel_close(jnp.concatenate(ys, 1), y_seg, TOL, "decoded packed vs parallel packed")


def test_channel_mix_init_cache_needs_d_model():
  with pytest.raises(ValueError, match="needs d_model"):
    RWKVChannelMix(hidden=64).init_cache(1, 8)


# mLSTM.


def test_mlstm_init_and_inner_width():
  m = mlstm.MLSTM(d_model=D, num_heads=4, n_layers=2)
  p = _init(m)
  assert p["proj_up"]["kernel"].shape == (D, 2 * 64)  # 2·32 = 64 (already a multiple of 64)
  np.testing.assert_allclose(p["fgate"]["bias"], np.linspace(3, 6, 4), rtol=1e-6)
  assert not np.any(p["fgate"]["kernel"]) and not np.any(p["igate"]["kernel"])
  assert np.all(p["learnable_skip"] == 1) and np.all(p["outnorm_scale"] == 1)
  assert mlstm.MLSTM(d_model=40)._inner() == 128  # 80 rounded up to a multiple of 64
  # small init N(0, 2/(5D)) and wang init N(0, (2/(L sqrt D))²): check the spreads roughly.
  assert abs(p["proj_up"]["kernel"].std() / np.sqrt(2 / (5 * D)) - 1) < 0.1
  assert abs(p["proj_down"]["kernel"].std() / (2 / 2 / np.sqrt(D)) - 1) < 0.1


def test_mlstm_equals_direct_recurrence():
  m = mlstm.MLSTM(d_model=D, num_heads=2, round_proj_to=16, chunk_size=4)
  x, p, y = _setup(m)
  b, t, _ = x.shape
  e, h = 64, 2
  dk = e // h
  xm, z = np.split(x @ p["proj_up"]["kernel"], 2, axis=-1)
  c = _conv_silu(xm, p["conv1d"]["kernel"], p["conv1d"]["bias"])
  blocks = lambda a, w: np.einsum("btni,nio->btno", a.reshape(b, t, -1, 4), w).reshape(b, t, e)
  q, k, v = blocks(c, p["q_proj"]), blocks(c, p["k_proj"]), blocks(xm, p["v_proj"])
  qkv = np.concatenate([q, k, v], -1)
  li = qkv @ p["igate"]["kernel"] + p["igate"]["bias"]                      # [b, t, h]
  lf = -np.logaddexp(0, -(qkv @ p["fgate"]["kernel"] + p["fgate"]["bias"]))  # logsigmoid
  q, k, v = (a.reshape(b, t, h, dk) for a in (q, k, v))
  q = q / np.sqrt(dk)
  cm, nm, mm = np.zeros((b, h, dk, dk)), np.zeros((b, h, dk)), np.zeros((b, h))
  out = np.zeros((b, t, h, dk))
  for i in range(t):  # the paper's stabilised recurrence (the op's eps = 1e-6 included)
    m_new = np.maximum(lf[:, i] + mm, li[:, i])
    fd, idec = np.exp(lf[:, i] + mm - m_new), np.exp(li[:, i] - m_new)
    cm = fd[..., None, None] * cm + idec[..., None, None] * k[:, i, :, :, None] * v[:, i, :, None]
    nm = fd[..., None] * nm + idec[..., None] * k[:, i]
    mm = m_new
    num = np.einsum("bhk,bhkv->bhv", q[:, i], cm)
    den = np.maximum(np.abs(np.einsum("bhk,bhk->bh", q[:, i], nm)), np.exp(-mm)) + 1e-6
    out[:, i] = num / den[..., None]
  hn = _layer_norm(out, 1e-5).reshape(b, t, e) * p["outnorm_scale"]
  want = ((hn + p["learnable_skip"] * c) * _silu(z)) @ p["proj_down"]["kernel"]
  assert_rel_close(y, want, TOL, "mlstm vs direct")


def test_mlstm_rejects_heads_not_dividing_inner_width():
  with pytest.raises(ValueError, match="must be divisible by num_heads=3"):
    mlstm.MLSTM(d_model=D, num_heads=3).init(jax.random.key(0), jnp.ones((1, 3, D)))


# DeltaNet and Gated DeltaNet.


def _delta_direct(q, k, v, beta, decay):
  """S_t = a_t S_{t−1}; S_t += k_tᵀ β_t (v_t − k_t S_t); o_t = K^-1/2 q_t S_t  (float64)."""
  b, t, h, dk = q.shape
  s = np.zeros((b, h, dk, v.shape[-1]))
  out = np.zeros(v.shape)
  for i in range(t):
    s = decay[:, i, :, None, None] * s
    err = v[:, i] - np.einsum("bhk,bhkv->bhv", k[:, i], s)
    s = s + k[:, i, :, :, None] * (beta[:, i, :, None] * err)[:, :, None, :]
    out[:, i] = np.einsum("bhk,bhkv->bhv", q[:, i], s) / np.sqrt(dk)
  return out


def _l2(a):
  return a / np.sqrt(np.sum(a * a, -1, keepdims=True) + deltanet.L2_EPS)


def _delta_inputs(x, p, h, key_dim):
  qkv = _conv_silu(np.concatenate([x @ p[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj")],
                                  -1), p["conv1d"]["kernel"])
  q, k, v = np.split(qkv, [key_dim, 2 * key_dim], axis=-1)
  heads = lambda a: a.reshape(*a.shape[:2], h, -1)
  return _l2(heads(q)), _l2(heads(k)), heads(v), _sigmoid(x @ p["b_proj"]["kernel"])


def test_deltanet_equals_direct_recurrence():
  m = deltanet.DeltaNet(d_model=D, num_heads=2, expand_v=0.75, chunk_size=4)
  x, p, y = _setup(m)
  q, k, v, beta = _delta_inputs(x, p, 2, D)
  o = _delta_direct(q, k, v, beta, np.ones(beta.shape))
  o = _rms(o, 1e-5) * p["o_norm"]["scale"]
  want = o.reshape(*x.shape[:2], -1) @ p["o_proj"]["kernel"]
  assert_rel_close(y, want, TOL, "deltanet vs direct")


def test_gated_deltanet_equals_direct_recurrence():
  m = gated_deltanet.GatedDeltaNet(d_model=D, num_heads=2, head_dim=8, expand_v=1.5,
                                   chunk_size=4)
  x, p, y = _setup(m)
  q, k, v, beta = _delta_inputs(x, p, 2, 16)
  dt = np.logaddexp(0, x @ p["a_proj"]["kernel"] + p["dt_bias"])           # softplus
  o = _delta_direct(q, k, v, beta, np.exp(-np.exp(p["A_log"]) * dt))
  gate = (x @ p["g_proj"]["kernel"]).reshape(o.shape)
  o = _rms(o, 1e-5) * p["o_norm"]["scale"] * _silu(gate)
  want = o.reshape(*x.shape[:2], -1) @ p["o_proj"]["kernel"]
  assert_rel_close(y, want, TOL, "gated_deltanet vs direct")


def test_gated_deltanet_init_ranges():
  p = _init(gated_deltanet.GatedDeltaNet(d_model=D, num_heads=64, head_dim=4))
  a = np.exp(p["A_log"])
  assert np.all((a > 0) & (a <= 16))
  dt = np.logaddexp(0, p["dt_bias"])
  assert np.all((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-6)), dt
  assert abs(p["q_proj"]["kernel"].std() / 0.02 - 1) < 0.1


def test_delta_mixers_reject_bad_config():
  x = jnp.ones((1, 3, D))
  with pytest.raises(ValueError, match="must be divisible by num_heads=3"):
    deltanet.DeltaNet(d_model=D, num_heads=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="must be an integer"):
    gated_deltanet.GatedDeltaNet(d_model=D, num_heads=2, head_dim=5, expand_v=1.5).init(
        jax.random.key(0), x)
  with pytest.raises(ValueError, match="dt_min <= dt_max"):
    gated_deltanet.GatedDeltaNet(d_model=D, num_heads=2, head_dim=8, dt_min=0.2).init(
        jax.random.key(0), x)
