"""Feature-map linear attentions (Based, ReBased, Hedgehog, Performer, cosFormer) and their maps.

The protocol (causality, decoding, prefill, segments, gradients, lag-2 copy) is checked for every
registered mixer by tests/mixers/test_protocol.py. Here: the feature maps against the kernels they
stand for, each mixer's output against a direct float64 formula (the T×T kernel matrix, masked
causally, normalised row by row) from its own parameters, the initialisation, and config errors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.common import feature_maps as fm
from seqmix.mixers.linear import based, cosformer, hedgehog, performer, rebased
from seqmix.testing import RTOL, assert_rel_close

D = mt.D_MODEL
# The mixers run in float32 (chunked gla); the oracles run in float64 from the same parameters.
TOL = RTOL["float32"]


def _rand(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape)


def _setup(module, t=11, b=2, seed=0):
  """(x, params, y, params as given): float64 copies for the oracle, the float32 output."""
  return mt.oracle_setup(module, t, b, seed)


def _proj(x, p):
  y = np.einsum("btd,dhk->bthk", x, p["kernel"])   # [b, t, h, k]
  return y + p["bias"] if "bias" in p else y


def _out(o, p):
  y = np.einsum("bthk,hkd->btd", o, p["kernel"])   # [b, t, d]
  return y + p["bias"] if "bias" in p else y


def _normalised(kernel, v, eps):
  """kernel [b, h, t, s] (any values), causal mask, rows normalised: -> [b, t, h, v]."""
  t = kernel.shape[-1]
  a = kernel * np.tril(np.ones((t, t)))
  num = np.einsum("bhts,bshv->bthv", a, v)
  den = np.einsum("bhts->bth", a)[..., None]
  return num / (den + eps)


# Feature maps.


def test_taylor_exp_is_the_second_order_expansion():
  q, k = _rand(0, 5, 16), _rand(1, 5, 16)
  got = np.sum(np.asarray(fm.taylor_exp(jnp.asarray(q))) * np.asarray(fm.taylor_exp(
      jnp.asarray(k))), -1)
  s = np.sum(q * k, -1) / 4.0                                       # q·k/√F, F = 16
  assert_rel_close(got, 1 + s + s * s / 2, TOL)
  assert fm.taylor_exp(jnp.asarray(q)).shape[-1] == fm.taylor_exp_size(16) == 1 + 16 + 136


def test_quadratic_features_give_the_squared_dot_product():
  q, k = _rand(2, 3, 7), _rand(3, 3, 7)
  got = np.sum(np.asarray(fm.quadratic(jnp.asarray(q))) * np.asarray(fm.quadratic(
      jnp.asarray(k))), -1)
  assert_rel_close(got, np.sum(q * k, -1) ** 2, TOL)


def test_cos_reweight_decomposes_the_distance_cosine():
  x, y = _rand(4, 1, 6, 1, 5), _rand(5, 1, 6, 1, 5)
  pos = np.array([[0, 3, 4, 9, 20, 31]])
  m = 32
  fx = np.asarray(fm.cos_reweight(jnp.asarray(x), jnp.asarray(pos), m))[0, :, 0]  # [t, 2d]
  fy = np.asarray(fm.cos_reweight(jnp.asarray(y), jnp.asarray(pos), m))[0, :, 0]
  got = fx @ fy.T                                                   # [t, t]
  rel = np.maximum(x[0, :, 0], 0) @ np.maximum(y[0, :, 0], 0).T
  want = rel * np.cos(np.pi / (2 * m) * (pos[0][:, None] - pos[0][None, :]))
  assert_rel_close(got, want, TOL)


def test_orthogonal_gaussian_blocks_are_orthogonal_and_fixed_by_the_seed():
  w = fm.orthogonal_gaussian((0, 3), 20, 8)                         # blocks of 8, 8, 4 rows
  assert w.shape == (20, 8)
  for blk in (w[:8], w[8:16], w[16:]):
    gram = blk @ blk.T
    assert np.abs(gram - np.diag(np.diag(gram))).max() < 1e-4 * np.diag(gram).max()
  np.testing.assert_array_equal(w, fm.orthogonal_gaussian((0, 3), 20, 8))
  assert not np.allclose(w, fm.orthogonal_gaussian((0, 4), 20, 8))


def test_favor_features_estimate_the_softmax_kernel():
  # E[φ(q)·φ(k)] = exp(q·k/√d) (feature eps 0, no stabiliser): with |q'|,|k'| ~ 0.5 one
  # feature product has relative sd <= ~1 (sd² = e^{2|x+y|²−|x|²−|y|²} − e^{2x·y} over e^{2x·y}),
  # so m = 16384 features give a relative sd below 1/128 ≈ 0.008 (orthogonality only lowers
  # it); 0.05 is ~6 sd.
  d, m = 8, 16384
  q = 0.5 * d ** 0.25 * _rand(6, 1, 1, 1, d) / math.sqrt(d)
  k = 0.5 * d ** 0.25 * _rand(7, 1, 1, 1, d) / math.sqrt(d)
  w = jnp.asarray(fm.orthogonal_gaussian((1,), m, d))
  phi = lambda x: np.asarray(fm.favor_positive(jnp.asarray(x, jnp.float32), w, is_query=False,
                                               eps=0.0), np.float64)
  est = float(np.sum(phi(q) * phi(k)))
  want = math.exp(float(np.sum(q * k)) / math.sqrt(d))
  assert abs(est / want - 1) < 0.05, (est, want)


def test_favor_query_stabiliser_cancels_in_the_ratio():
  w = jnp.asarray(fm.orthogonal_gaussian((2,), 32, 8))
  q, k = jnp.asarray(_rand(8, 1, 1, 1, 8), jnp.float32), jnp.asarray(_rand(9, 1, 4, 1, 8),
                                                                     jnp.float32)
  pk = fm.favor_positive(k, w, is_query=False, eps=0.0)[0, :, 0]     # [4, m]
  a = fm.favor_positive(q, w, is_query=True, eps=0.0)[0, 0, 0] @ pk.T
  b = fm.favor_positive(q, w, is_query=False, eps=0.0)[0, 0, 0] @ pk.T
  assert_rel_close(a / a.sum(), b / b.sum(), TOL)


# Mixers against direct formulas.


def _window_attention64(x, p, num_heads, window, base=10000.0):
  """Sliding-window causal softmax attention with full rotate-half RoPE, float64.

  x [B,T,D], p: q/k/v/o projections -> [B,T,D]; token t sees tokens t−W < s <= t.
  """
  t = x.shape[1]
  q, k, v = _proj(x, p["q_proj"]), _proj(x, p["k_proj"]), _proj(x, p["v_proj"])  # [b,t,h,dh]
  dh = q.shape[-1]
  ang = np.arange(t)[:, None] * base ** (-np.arange(0, dh, 2) / dh)   # [t, dh/2]
  cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  rot = lambda a: np.concatenate([a[..., :dh // 2] * cos - a[..., dh // 2:] * sin,
                                  a[..., dh // 2:] * cos + a[..., :dh // 2] * sin], -1)
  logits = np.einsum("bthk,bshk->bhts", rot(q), rot(k)) / math.sqrt(dh)
  lag = np.arange(t)[:, None] - np.arange(t)[None, :]
  logits = np.where((lag >= 0) & (lag < window), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  o = np.einsum("bhts,bshk->bthk", w / w.sum(-1, keepdims=True), v)
  return _out(o, p["o_proj"])


def test_based_matches_taylor_kernel_plus_window_attention():
  """Both branches from the formulas (T = 20 spans several windows of 3). The linear branch's
  output projection starts 0.02/√2-small (its share of y is ~1%), so each branch is also
  checked alone, with the other's output projection zeroed."""
  m = based.Based(d_model=D, num_heads=2, feature_dim=4, window=3, chunk_size=8)
  x, p, y, p32 = _setup(m, t=20)
  q, k, v = _proj(x, p["q_proj"]), _proj(x, p["k_proj"]), _proj(x, p["v_proj"])
  s = np.einsum("bthf,bshf->bhts", q, k) / math.sqrt(4)             # q·k/√F  [b, h, t, s]
  lin = _out(_normalised(1 + s + s * s / 2, v, m.eps), p["o_proj"])
  swa = _window_attention64(x, p["window_attn"], 2, 3)
  assert_rel_close(y, lin + swa, TOL, "based")
  apply = jax.jit(lambda p_: m.apply({"params": p_}, jnp.asarray(x, jnp.float32))[0])
  zero_out = lambda tree: {**tree, "o_proj": {"kernel": jnp.zeros_like(tree["o_proj"]["kernel"])}}
  assert_rel_close(apply({**p32, "window_attn": zero_out(p32["window_attn"])}), lin, TOL,
                   "based linear branch")
  assert_rel_close(apply(zero_out(p32)), swa, TOL, "based window branch")


def test_rebased_matches_squared_normalised_kernel():
  m = rebased.ReBased(d_model=D, num_heads=2, feature_dim=4)
  x, p, y, _ = _setup(m)
  q, k, v = _proj(x, p["q_proj"]), _proj(x, p["k_proj"]), _proj(x, p["v_proj"])
  ln = p["kernel_norm"]

  def affine(z):
    mu = z.mean(-1, keepdims=True)
    var = ((z - mu) ** 2).mean(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + m.norm_eps) * ln["scale"] + ln["bias"]

  s = np.einsum("bthf,bshf->bhts", affine(q), affine(k))
  assert_rel_close(y, _out(_normalised(s * s / 4, v, m.eps), p["o_proj"]), TOL)


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_hedgehog_matches_softmax_feature_kernel():
  m = hedgehog.Hedgehog(d_model=D, num_heads=2)
  x, p, y, _ = _setup(m)
  q, k, v = _proj(x, p["q_proj"]), _proj(x, p["k_proj"]), _proj(x, p["v_proj"])

  def phi(z, fp):
    a = np.einsum("bthd,hdf->bthf", z, fp["kernel"]) + fp["bias"]
    return np.concatenate([_softmax(a), _softmax(-a)], -1)

  kern = np.einsum("bthf,bshf->bhts", phi(q, p["q_feature_map"]), phi(k, p["k_feature_map"]))
  assert_rel_close(y, _out(_normalised(kern, v, m.eps), p["o_proj"]), TOL)


def test_performer_matches_favor_kernel():
  m = performer.Performer(d_model=D, num_heads=2, num_features=24, layer_idx=1)
  x, p, y, _ = _setup(m)
  q, k, v = _proj(x, p["q_proj"]), _proj(x, p["k_proj"]), _proj(x, p["v_proj"])
  w = np.asarray(m.projection(), np.float64)                        # [m, d/h]
  hd = D // 2

  def phi(z, is_query):
    z = z / hd ** 0.25
    a = np.einsum("bthd,md->bthm", z, w) - 0.5 * np.sum(z * z, -1, keepdims=True)
    if is_query:
      a = a - np.max(a + 0.5 * np.sum(z * z, -1, keepdims=True), -1, keepdims=True)
    return (np.exp(a) + m.feature_eps) / math.sqrt(w.shape[0])

  kern = np.einsum("bthm,bshm->bhts", phi(q, True), phi(k, False))
  assert_rel_close(y, _out(_normalised(kern, v, m.eps), p["o_proj"]), TOL)


def test_cosformer_matches_reweighted_relu_kernel():
  m = cosformer.CosFormer(d_model=D, num_heads=2, max_len=16)
  x, p, y, _ = _setup(m)
  q, k, v = _proj(x, p["q_proj"]), _proj(x, p["k_proj"]), _proj(x, p["v_proj"])
  t = x.shape[1]
  dist = np.arange(t)[:, None] - np.arange(t)[None, :]
  kern = np.einsum("bthd,bshd->bhts", np.maximum(q, 0), np.maximum(k, 0))
  kern = kern * np.cos(np.pi / (2 * 16) * dist)
  assert_rel_close(y, _out(_normalised(kern, v, m.eps), p["o_proj"]), TOL)


def test_cosformer_depends_on_position_differences_only():
  m = mt.build("cosformer")
  x = mt.random_inputs(0, 2, 9)
  params = mt.init_params(m, x)
  run = jax.jit(lambda pos: m.apply({"params": params}, x, positions=pos)[0])
  pos = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
  assert_rel_close(run(pos + 7), run(pos), TOL)
  assert not np.allclose(run(pos * 2), run(pos))  # the re-weighting is really used


# Initialisation and fixed parameters.


def test_rebased_kernel_starts_as_plain_layernorm():
  m = rebased.ReBased(d_model=D, num_heads=2, feature_dim=4)
  p = jax.jit(m.init)(jax.random.key(0), mt.random_inputs(0, 1, 3))["params"]
  np.testing.assert_array_equal(p["kernel_norm"]["scale"].value, np.ones(4))
  np.testing.assert_array_equal(p["kernel_norm"]["bias"].value, np.zeros(4))


def test_hedgehog_maps_start_as_identity_softmax_pair():
  m = hedgehog.Hedgehog(d_model=D, num_heads=2)
  p = jax.jit(m.init)(jax.random.key(0), mt.random_inputs(0, 1, 3))["params"]
  for name in ("q_feature_map", "k_feature_map"):
    np.testing.assert_array_equal(p[name]["kernel"].value, np.broadcast_to(np.eye(16),
                                                                           (2, 16, 16)))
    np.testing.assert_array_equal(p[name]["bias"].value, np.zeros((2, 16)))


def test_based_projection_stds_follow_gpt2_init():
  m = based.Based(d_model=256, num_heads=4, n_layers=8)
  p = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 2, 256)))["params"]
  # 256 × 256 draws: the sample std is within ~0.5% of the truth (1 sd); 5% is ~10 sd.
  np.testing.assert_allclose(np.std(p["v_proj"]["kernel"].value), 0.02, rtol=0.05)
  np.testing.assert_allclose(np.std(p["o_proj"]["kernel"].value), 0.02 / 4.0, rtol=0.05)


def test_cosformer_init_matches_torch_linear_default():
  m = cosformer.CosFormer(d_model=64, num_heads=4)
  p = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 2, 64)))["params"]
  w = np.asarray(p["q_proj"]["kernel"].value)
  assert np.abs(w).max() <= 1 / 8 and np.abs(w).max() > 0.9 / 8   # U(±1/√fan_in), fan_in 64


def test_performer_features_are_fixed_and_not_parameters():
  m = performer.Performer(d_model=D, num_heads=2, num_features=24)
  p = jax.jit(m.init)(jax.random.key(0), mt.random_inputs(0, 1, 3))["params"]
  sizes = [leaf.size for leaf in jax.tree.leaves(p)]
  assert 24 * 16 not in sizes  # no [m, d/h] leaf: the features are not a variable
  np.testing.assert_array_equal(m.projection(), performer.Performer(
      d_model=D, num_heads=2, num_features=24).projection())
  assert not np.allclose(m.projection(), performer.Performer(
      d_model=D, num_heads=2, num_features=24, layer_idx=1).projection())
  assert performer.Performer(d_model=64, num_heads=4)._dims()[2] == round(16 * math.log(16))


def test_based_decode_cache_has_constant_size():
  m = mt.build("based")
  small, large = m.init_cache(2, 16), m.init_cache(2, 100_000)
  shapes = lambda c: [a.shape for a in jax.tree.leaves(c)]
  assert shapes(small) == shapes(large)
  assert large.window.k.shape[1] == m.window


# Configuration errors.


@pytest.mark.parametrize("cls,kwargs,match", [
    (based.Based, {"num_heads": 3}, "num_heads"),
    (based.Based, {"num_heads": 2, "window": 0}, "window=0"),
    (rebased.ReBased, {"num_heads": 2, "feature_dim": 1}, "feature_dim=1"),
    (hedgehog.Hedgehog, {"num_heads": 2, "feature_dim": 8}, "identity_init"),
    (performer.Performer, {"num_heads": 5}, "num_heads"),
    (cosformer.CosFormer, {"num_heads": 2, "max_len": 0}, "max_len=0"),
])
def test_bad_hyperparameters_raise_clear_errors(cls, kwargs, match):
  with pytest.raises(ValueError, match=match):
    cls(d_model=D, **kwargs).init_cache(1, 8)


@pytest.mark.parametrize("name", ["based", "rebased", "hedgehog", "performer", "cosformer"])
def test_bfloat16_compute_stays_close_to_float32(name):
  x = mt.random_inputs(0, 2, 13)
  params = mt.init_params(mt.build(name), x)
  y32, _ = jax.jit(mt.build(name).apply)({"params": params}, x)
  y16, _ = jax.jit(mt.build(name, dtype=jnp.bfloat16).apply)({"params": params}, x)
  assert y16.dtype == jnp.bfloat16
  assert_rel_close(y16.astype(jnp.float32), y32, RTOL["bfloat16"])
