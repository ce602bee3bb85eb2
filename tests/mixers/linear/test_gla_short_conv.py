"""GLA's and HGRN2's short-convolution option (fla's `use_short_conv`) and the init decays that
the MQAR diagnosis (README "MQAR") rests on: float64 oracles written from the equations, and the
shared protocol checks for the non-default variants (the protocol tests only run defaults)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.linear import gateloop, gla, hgrn2
from seqmix.testing import RTOL, assert_rel_close

D = mt.D_MODEL
TOL = RTOL["float32"]  # mixers run float32; the oracles float64 from the same parameters


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _rms(x, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _causal_depthwise(u, w):
  """u [b, t, c], w [L, c] with w[0] on the current token -> y_t = Σ_s w[s] u_{t-s}."""
  y = np.zeros_like(u)
  for s in range(w.shape[0]):
    y[:, s:] += w[s] * u[:, :u.shape[1] - s]
  return y


def test_gla_short_conv_equals_conv_then_per_key_recurrence():
  h = 2
  m = gla.GLA(d_model=D, num_heads=h, use_short_conv=True, conv_size=3, chunk_size=4)
  x, p, y = mt.oracle_setup(m, 11, 2, 0)[:3]
  kd = D // 2
  qkv = np.concatenate([x @ p[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj")], -1)
  assert p["conv1d"]["kernel"].shape == (3, 2 * kd + D) and "bias" not in p["conv1d"]
  qkv = _silu(_causal_depthwise(qkv, p["conv1d"]["kernel"]))
  q, k, v = (a.reshape(*a.shape[:2], h, -1) for a in np.split(qkv, [kd, 2 * kd], -1))
  gk = p["gk_proj"]
  a = _sigmoid(x @ gk["down"] @ gk["up"] + gk["bias"]) ** (1 / 16)     # exp(logsigmoid/16)
  a = a.reshape(*a.shape[:2], h, -1)
  gate = (x @ p["g_proj"]["kernel"]).reshape(*x.shape[:2], h, -1)
  s = np.zeros((x.shape[0], h, q.shape[-1], v.shape[-1]))
  outs = []
  for t in range(x.shape[1]):
    s = a[:, t, :, :, None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
    outs.append(np.einsum("bhk,bhkv->bhv", q[:, t], s) * q.shape[-1] ** -0.5)
  o = _rms(np.stack(outs, 1), m.norm_eps) * p["g_norm"]["scale"] * _silu(gate)
  assert_rel_close(y, o.reshape(*o.shape[:2], -1) @ p["o_proj"]["kernel"], TOL, "gla+conv")


def _conv_variant():
  m = gla.GLA(d_model=D, num_heads=2, use_short_conv=True, chunk_size=4)
  x = mt.random_inputs(0, 2, 9)
  params = mt.random_params(m, x)
  return m, params, x


def test_gla_short_conv_decode_prefill_segments():
  """Decode == parallel, split prefill, packed documents isolated (the conv cache carries)."""
  m, params, x = _conv_variant()
  run = mt.Runner(m, params)
  mt.check_decode_matches_parallel(run, x)
  mt.check_split_prefill(run, x, 5)
  mt.check_segments(run, x, 4)
  assert m.init_cache(2, 9).conv.inputs.shape == (2, 3, D // 2 * 2 + D)


@pytest.mark.slow
def test_gla_short_conv_causal_and_grads():
  m, params, x = _conv_variant()
  mt.check_causal(m, params, x)
  mt.check_finite_grads(m, params, x)


def test_gla_without_conv_has_no_conv_params_or_cache():
  m = gla.GLA(d_model=D, num_heads=2)
  p = nn.meta.unbox(m.init(jax.random.key(0), jnp.ones((1, 3, D))))["params"]
  assert "conv1d" not in p and m.init_cache(1, 3).conv is None


def test_gla_bad_conv_size_raises():
  with pytest.raises(ValueError, match="conv_size=0"):
    gla.GLA(d_model=D, num_heads=2, use_short_conv=True, conv_size=0).init(
        jax.random.key(0), jnp.ones((1, 3, D)))


# HGRN2.


@pytest.mark.parametrize("layer_idx", [0, 1])
def test_hgrn2_short_conv_equals_conv_then_tied_gate_recurrence(layer_idx):
  m = hgrn2.HGRN2(d_model=D, expand_ratio=16, layer_idx=layer_idx, n_layers=2,
                  use_short_conv=True, conv_size=3, chunk_size=4)
  x, p, y = mt.oracle_setup(m, 11, 2, 0)[:3]
  lb = layer_idx / 2
  qfi = np.concatenate([x @ p[n]["kernel"] for n in ("q_proj", "f_proj", "i_proj")], -1)
  assert p["conv1d"]["kernel"].shape == (3, 3 * D) and "bias" not in p["conv1d"]
  q, f, i = np.split(_causal_depthwise(qfi, p["conv1d"]["kernel"]), 3, -1)   # no activation
  q = _silu(q).reshape(*x.shape[:2], 2, 16)
  f = (lb + (1 - lb) * _sigmoid(f)).reshape(*x.shape[:2], 2, 16)
  i = i.reshape(*x.shape[:2], 2, 16)
  s = np.zeros((x.shape[0], 2, 16, 16))
  outs = []
  for t in range(x.shape[1]):
    s = f[:, t, :, :, None] * s + (1 - f[:, t, :, :, None]) * i[:, t, :, None, :]
    outs.append(np.einsum("bhk,bhkv->bhv", q[:, t], s) * 16 ** -0.5)
  o = _rms(np.stack(outs, 1).reshape(*x.shape[:2], D), m.norm_eps) * p["g_norm"]["scale"]
  assert_rel_close(y, o @ p["o_proj"]["kernel"], TOL, "hgrn2+conv")


def test_hgrn2_short_conv_decode_prefill_segments():
  m = hgrn2.HGRN2(d_model=D, expand_ratio=16, layer_idx=1, n_layers=2, use_short_conv=True,
                  chunk_size=4)
  x = mt.random_inputs(0, 2, 9)
  run = mt.Runner(m, mt.random_params(m, x))
  mt.check_decode_matches_parallel(run, x)
  mt.check_split_prefill(run, x, 5)
  mt.check_segments(run, x, 4)
  assert m.init_cache(2, 9).conv.inputs.shape == (2, 3, 3 * D)


# Init decays (README "MQAR": the per-token decay a layer starts from, on unit-RMS inputs).


def _init_decays(name, layer_idx, d=128):
  x = np.asarray(mt.random_inputs(0, 4, 32, d))                         # RMS ≈ 1 (pre-norm)
  cls = {"gla": gla.GLA, "hgrn2": hgrn2.HGRN2, "gateloop": gateloop.GateLoop}[name]
  m = cls(d_model=d, layer_idx=layer_idx, n_layers=2)
  p = jax.tree.map(np.asarray, nn.meta.unbox(m.init(jax.random.key(1), jnp.asarray(x)))["params"])
  if name == "gla":
    g = p["gk_proj"]
    return _sigmoid(x @ g["down"] @ g["up"] + g["bias"]) ** (1 / 16)
  if name == "hgrn2":
    lb = layer_idx / 2
    return lb + (1 - lb) * _sigmoid(x @ p["f_proj"]["kernel"])
  return _sigmoid(x @ p["magnitude_proj"]["kernel"] + p["magnitude_proj"]["bias"])


def test_gla_init_decay_is_flas():
  """fla: exp(logsigmoid(≈0)/16) = 2^(-1/16) ≈ 0.958, nearly the same for every token."""
  dec = _init_decays("gla", 0)
  assert abs(np.median(dec) - 2 ** (-1 / 16)) < 2e-3 and dec.min() > 0.95 and dec.max() < 0.965


@pytest.mark.parametrize("name,layer_idx,median", [("hgrn2", 0, 0.5), ("hgrn2", 1, 0.75),
                                                   ("gateloop", 0, 0.5)])
def test_hgrn2_and_gateloop_start_with_one_token_memory(name, layer_idx, median):
  """σ(≈0) = 0.5 (HGRN2 layer l of L lifted to l/L + (1 − l/L)·0.5): half-lives of 1–2.4
  tokens at init, against GLA's 16; this is the init fla / the paper use, not a defect."""
  dec = _init_decays(name, layer_idx)
  assert abs(np.median(dec) - median) < 0.03, np.median(dec)
