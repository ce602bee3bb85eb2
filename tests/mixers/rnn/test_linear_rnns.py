"""Hawk (RG-LRU), Griffin's local MQA and pattern, HGRN, minGRU, minLSTM: parameterisation at
init, direct-formula equivalence, config errors.

The protocol (causality, decoding, prefill, segments, gradients, lag-2 copy) is checked for every
registered mixer by tests/mixers/test_protocol.py. Here each mixer's output is recomputed from its
parameters by a plain token-by-token numpy recurrence in float64, with document resets.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import registry
from seqmix.mixers import testing as mt
from seqmix.mixers.rnn import griffin, hawk, hgrn, mingru, minlstm, rglru
from seqmix.testing import RTOL, assert_rel_close

D = mt.D_MODEL
# The mixers run in float32; the oracles run in float64 from the same parameters.
TOL = RTOL["float32"]
SEG = np.array([[0] * 4 + [1] * 7, [5] * 9 + [6] * 2], np.int32)   # two packed documents per row


def _run(module, t=11, b=2, seed=0, segment_ids=None):
  """(x, params, y): float64 inputs and params for the oracle, the mixer's float32 output."""
  return mt.oracle_setup(module, t, b, seed, segment_ids)[:3]


def _init(module, d, seed=0):
  """The module's own init (no zero-leaf filling), jitted."""
  return nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, 2, d)))["params"])


def _sigmoid(v):
  return 1.0 / (1.0 + np.exp(-v))


def _silu(v):
  return v * _sigmoid(v)


def _softplus(v):
  return np.logaddexp(v, 0.0)


def _starts(seg, t, b):
  """Document starts; the stream's first token is always one."""
  s = np.zeros((b, t), bool)
  s[:, 0] = True
  if seg is not None:
    s[:, 1:] = seg[:, 1:] != seg[:, :-1]
  return s


def _scan(a, u, starts):
  """h_t = a_t h_{t−1} + u_t with h = 0 before each document start, [B, T, W] float64."""
  h, hs = np.zeros_like(u[:, 0]), []
  for i in range(u.shape[1]):
    h = np.where(starts[:, i, None], 0.0, a[:, i] * h) + u[:, i]
    hs.append(h)
  return np.stack(hs, 1)


# Hawk / RG-LRU.


def _hawk_oracle(x, p, m, seg):
  b, t, _ = x.shape
  lin = lambda v, q: v @ q["kernel"] + q["bias"]
  gelu = lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
  y = gelu(lin(x, p["linear_y"]))
  u = lin(x, p["linear_x"])
  segs = np.zeros((b, t), int) if seg is None else seg
  k, cb = p["conv_1d"]["kernel"], p["conv_1d"]["bias"]
  conv = np.zeros_like(u)
  for i in range(t):
    for s in range(k.shape[0]):
      if i - s >= 0:
        conv[:, i] += np.where((segs[:, i - s] == segs[:, i])[:, None], k[s] * u[:, i - s], 0)
  u = conv + cb
  r = p["rg_lru"]
  h_ = m.num_heads

  def block_diag(v, q):
    vb = v.reshape(b, t, h_, -1)
    return (np.einsum("bthi,hij->bthj", vb, q["w"]) + q["b"]).reshape(v.shape)

  gate_x = _sigmoid(block_diag(u, r["input_gate"]))
  gate_a = _sigmoid(block_diag(u, r["a_gate"]))
  a = np.exp(-8.0 * gate_a * _softplus(r["a_param"]))
  starts = _starts(seg, t, b)
  norm = np.where(starts[..., None], 1.0, np.sqrt(1 - a ** 2))
  h = _scan(a, norm * gate_x * u, starts)
  return lin(h * y, p["linear_out"])


@pytest.mark.parametrize("packed", [False, True])
def test_hawk_matches_direct_recurrence(packed):
  m = hawk.Hawk(d_model=D, num_heads=4)
  seg = SEG if packed else None
  x, p, y = _run(m, segment_ids=seg)
  assert_rel_close(y, _hawk_oracle(x, p, m, seg), TOL, "hawk vs direct recurrence")


def test_rglru_init_ring_and_gates():
  m = hawk.Hawk(d_model=D, lru_width=256, num_heads=4, n_layers=8)
  p = _init(m, D)
  a = np.exp(-_softplus(np.asarray(p["rg_lru"]["a_param"], np.float64)))
  assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6
  # Uniform by area: a² ~ U(0.81, 0.998), mean 0.904 (256 draws: sd of the mean ≈ 0.0034).
  assert abs((a ** 2).mean() - 0.904) < 0.02
  w = np.asarray(p["rg_lru"]["a_gate"]["w"])
  assert w.shape == (4, 64, 64)
  assert abs(w.std() - 256 ** -0.5) < 0.05 * 256 ** -0.5            # N(0, 1/W), 16k draws
  out = np.asarray(p["linear_out"]["kernel"])
  assert abs(out.std() - math.sqrt(2 / 8 / 256)) < 0.05 * math.sqrt(2 / 8 / 256)


def test_sqrt_gradient_is_bounded():
  grad = jax.grad(lambda v: rglru.sqrt_bounded_grad(v, 1000.0))
  assert float(grad(0.0)) == pytest.approx(1000.0)
  assert float(grad(1e-12)) == pytest.approx(1000.0)
  assert float(grad(0.25)) == pytest.approx(1.0)
  assert float(rglru.sqrt_bounded_grad(0.25, 1000.0)) == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_heads": 3}, "num_heads=3"),
    ({"num_heads": 0}, "num_heads=0"),
    ({"max_rad": 1.0}, "max_rad < 1"),
    ({"min_rad": 0.99, "max_rad": 0.9}, "min_rad <= max_rad"),
    ({"conv_width": 0}, "conv_width=0"),
])
def test_hawk_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    hawk.Hawk(d_model=D, **kwargs).init_cache(1, 4)


# Griffin.


def test_griffin_pattern_and_local_mqa_defaults():
  assert registry.expand_pattern("griffin", 5) == ["hawk", "hawk", "local_mqa", "hawk", "hawk"]
  info = registry.get("griffin")
  assert info.is_pattern and info.family == "hybrid"
  m = griffin.LocalMQA(d_model=D)
  assert (m.num_kv_heads, m.window, m.rope_fraction) == (1, 1024, 0.5)
  cache = m.init_cache(2, 100)            # the ring holds min(window, max_len) slots
  assert cache.k.shape == (2, 100, 1, D // m.num_heads)


def test_local_mqa_sees_only_its_window():
  m = griffin.LocalMQA(d_model=D, num_heads=4, window=3)
  x = mt.random_inputs(0, 1, 8)
  params = mt.init_params(m, x)
  grad = jax.jit(jax.grad(lambda v: m.apply({"params": params}, v)[0][0, 6].sum()))(x)
  reach = np.abs(np.asarray(grad[0])).sum(axis=-1)                  # [8]: per input token
  assert np.all(reach[4:7] > 0) and np.all(reach[:4] == 0) and reach[7] == 0


def test_local_mqa_needs_a_window():
  with pytest.raises(ValueError, match="window=None"):
    griffin.LocalMQA(d_model=D, window=None).init_cache(1, 4)


# HGRN.


def _hgrn_oracle(x, p, lower, seg):
  b, t, _ = x.shape
  i, f, g = (x @ p[n]["kernel"] for n in ("i_proj", "f_proj", "g_proj"))
  forget = lower + (1 - lower) * _sigmoid(f)
  h = _scan(forget, _silu(i) * (1 - forget), _starts(seg, t, b))
  o = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-5) * p["g_norm"]["scale"] * _silu(g)
  return o @ p["o_proj"]["kernel"]


@pytest.mark.parametrize("layer_idx, packed", [(0, False), (2, True)])
def test_hgrn_matches_direct_recurrence(layer_idx, packed):
  m = hgrn.HGRN(d_model=D, layer_idx=layer_idx, n_layers=4)
  seg = SEG if packed else None
  x, p, y = _run(m, segment_ids=seg)
  assert_rel_close(y, _hgrn_oracle(x, p, layer_idx / 4, seg), TOL, "hgrn vs direct recurrence")


def test_hgrn_forget_lower_bound_rises_with_depth():
  """A constant input through the recurrence: h_t/h_{t-1} = f >= layer_idx / n_layers."""
  x = -50.0 * jnp.ones((1, 6, D))     # drives σ(x W_f) towards 0 or 1 per channel
  floors = []
  for layer in range(4):
    m = hgrn.HGRN(d_model=D, layer_idx=layer, n_layers=4)
    p = _init(m, D)
    f = _sigmoid(np.asarray(x[0, 0] @ p["f_proj"]["kernel"], np.float64))
    floors.append((layer / 4 + (1 - layer / 4) * f).min())
  assert all(fl >= layer / 4 for layer, fl in enumerate(floors))
  assert floors == sorted(floors) and floors[0] < 1e-3


def test_hgrn_config_errors():
  with pytest.raises(ValueError, match="layer_idx=4"):
    _init(hgrn.HGRN(d_model=D, layer_idx=4, n_layers=4), D)
  with pytest.raises(ValueError, match="expand_ratio=0"):
    hgrn.HGRN(d_model=D, expand_ratio=0).init_cache(1, 4)


# minGRU / minLSTM.


def _g(v):
  return np.where(v >= 0, v + 0.5, _sigmoid(v))


def _min_rnn_oracle(x, p, kind, seg):
  b, t, _ = x.shape
  w = p["in_proj"]["kernel"].shape[1] // (2 if kind == "mingru" else 3)
  proj = x @ p["in_proj"]["kernel"] + p["in_proj"]["bias"]
  if kind == "mingru":
    z, h_tilde = _sigmoid(proj[..., :w]), _g(proj[..., w:])
    a, u = 1 - z, z * h_tilde
  else:
    f, i, h_tilde = _sigmoid(proj[..., :w]), _sigmoid(proj[..., w:2 * w]), _g(proj[..., 2 * w:])
    a, u = f / (f + i), i / (f + i) * h_tilde
  h = _scan(a, u, _starts(seg, t, b))
  return h @ p["out_proj"]["kernel"] + p["out_proj"]["bias"] if "out_proj" in p else h


@pytest.mark.parametrize("cls, expand, packed", [
    (mingru.MinGRU, 1, False), (mingru.MinGRU, 2, True),
    (minlstm.MinLSTM, 1, True), (minlstm.MinLSTM, 2, False)])
def test_min_rnns_match_direct_recurrence(cls, expand, packed):
  m = cls(d_model=D, expand=expand)
  seg = SEG if packed else None
  x, p, y = _run(m, segment_ids=seg)
  assert ("out_proj" in p) == (expand != 1)
  assert_rel_close(y, _min_rnn_oracle(x, p, cls.registry_name, seg), TOL,
                   f"{cls.registry_name} vs direct recurrence")


def test_g_activation():
  v = np.array([-30.0, -1.0, 0.0, 2.0])
  np.testing.assert_allclose(np.asarray(mingru.g(jnp.asarray(v))), _g(v), rtol=1e-6)
  assert float(mingru.g(0.0)) == 0.5 and float(mingru.g(-1e-7)) == pytest.approx(0.5)


@pytest.mark.parametrize("cls", [mingru.MinGRU, minlstm.MinLSTM])
@pytest.mark.parametrize("kwargs, match", [
    ({"expand": 0}, "expand=0"), ({"candidate_activation": "relu"}, "candidate_activation")])
def test_min_rnn_config_errors(cls, kwargs, match):
  with pytest.raises(ValueError, match=match):
    cls(d_model=D, **kwargs).init_cache(1, 4)
