"""GLA's and HGRN2's short-convolution option (fla's `use_short_conv`) and the init decays that
the MQAR diagnosis (README "MQAR") rests on: float64 oracles written from the equations, and the
shared protocol checks for the non-default variants (the protocol tests only run defaults)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.linear import gla
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
