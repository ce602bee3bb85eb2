"""The block's parts: norms and MLPs of seqmix.mixers.common (against their formulas)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers.common import mlp, norms
from seqmix.testing import RTOL, assert_rel_close

X = np.random.default_rng(0).standard_normal((2, 3, 12)).astype(np.float32) * 3 + 1
Z = np.random.default_rng(1).standard_normal((2, 3, 12)).astype(np.float32)


def _run(module, *args):
  params = module.init(jax.random.key(0), *args)
  return module.apply(params, *args), params["params"]


def _silu(z):
  return z / (1 + np.exp(-z))


def _rms(x, eps):
  return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + eps)


def test_rmsnorm_formula_and_bf16_io():
  y, params = _run(norms.RMSNorm(eps=1e-6), X)
  assert params["scale"].names == ("embed",)
  assert_rel_close(y, _rms(X, 1e-6), RTOL["float32"], "rmsnorm")
  yb, _ = _run(norms.RMSNorm(eps=1e-6), jnp.asarray(X, jnp.bfloat16))
  assert yb.dtype == jnp.bfloat16
  # Inputs rounded to bf16 (2^-9 relative) and the output rounded once more: ~4e-3 at most.
  assert_rel_close(yb.astype(jnp.float32), _rms(X, 1e-6), RTOL["bfloat16"], "bf16 rmsnorm")


@pytest.mark.parametrize("use_bias", [True, False])
def test_layernorm_formula_and_bias_option(use_bias):
  y, params = _run(norms.LayerNorm(eps=1e-5, use_bias=use_bias), X)
  assert ("bias" in params) == use_bias
  mu, var = X.mean(-1, keepdims=True), X.var(-1, keepdims=True)
  assert_rel_close(y, (X - mu) / np.sqrt(var + 1e-5), RTOL["float32"], "layernorm")


@pytest.mark.parametrize("before", [True, False])
@pytest.mark.parametrize("group", [None, 4])
def test_gated_rmsnorm(before, group):
  y, _ = _run(norms.GatedRMSNorm(eps=1e-6, group_size=group, norm_before_gate=before), X, Z)
  g = group or 12
  x = X if before else X * _silu(Z)
  want = _rms(x.reshape(2, 3, 12 // g, g), 1e-6).reshape(X.shape)  # [b, t, groups, g] -> [b, t, d]
  if before:
    want = want * _silu(Z)
  assert_rel_close(y, want, RTOL["float32"], "gated rmsnorm")


def test_gated_rmsnorm_bad_group_says_what_to_change():
  with pytest.raises(ValueError, match="group_size=5 must divide the channel count 12"):
    _run(norms.GatedRMSNorm(group_size=5), X, Z)


def test_mlps_match_their_formulas():
  y, p = _run(mlp.SwiGLU(hidden=7), X)
  k = {n: np.asarray(v["kernel"].value) for n, v in p.items()}
  want = ((_silu(X @ k["wi_gate"]) * (X @ k["wi_up"])) @ k["wo"])
  assert_rel_close(y, want, RTOL["float32"], "swiglu")
  y, p = _run(mlp.GeluMLP(hidden=9, use_bias=True), X)
  k = {n: np.asarray(v["kernel"].value) for n, v in p.items()}
  b = {n: np.asarray(v["bias"].value) for n, v in p.items()}
  want = jax.nn.gelu(X @ k["wi"] + b["wi"], approximate=False) @ k["wo"] + b["wo"]
  assert_rel_close(y, want, RTOL["float32"], "gelu mlp")
  assert p["wi"]["kernel"].names == ("embed", "mlp") and p["wo"]["kernel"].names == ("mlp", "embed")


def test_gelu_tanh_mlp_matches_gpt2_gelu_new():
  y, p = _run(mlp.GeluTanhMLP(hidden=9, use_bias=True), X)
  k = {n: np.asarray(v["kernel"].value, np.float64) for n, v in p.items()}
  b = {n: np.asarray(v["bias"].value, np.float64) for n, v in p.items()}
  h = np.asarray(X, np.float64) @ k["wi"] + b["wi"]
  gelu_new = 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h ** 3)))  # GPT-2
  assert_rel_close(y, gelu_new @ k["wo"] + b["wo"], RTOL["float32"], "gelu_tanh mlp")


def test_rmsnorm_1p_scales_by_one_plus_w():
  """Gemma's parameterisation: y = x / rms(x) · (1 + w), w = 0 at init."""
  m = norms.make_norm("rmsnorm_1p", eps=1e-6, use_bias=False, dtype=None,
                      param_dtype=jnp.float32)
  _, p = _run(m, X)
  np.testing.assert_array_equal(np.asarray(p["scale"].value), 0.0)
  w = np.random.default_rng(2).standard_normal(12).astype(np.float32)
  y = m.apply({"params": {"scale": w}}, X)
  assert_rel_close(y, _rms(np.asarray(X, np.float64), 1e-6) * (1.0 + w), RTOL["float32"],
                   "rmsnorm_1p")


def test_geglu_matches_its_formula():
  y, p = _run(mlp.GeGLU(hidden=7, use_bias=True), X)
  k = {n: np.asarray(v["kernel"].value, np.float64) for n, v in p.items()}
  b = {n: np.asarray(v["bias"].value, np.float64) for n, v in p.items()}
  x = np.asarray(X, np.float64)
  g = x @ k["wi_gate"] + b["wi_gate"]
  gelu = 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g ** 3)))
  want = (gelu * (x @ k["wi_up"] + b["wi_up"])) @ k["wo"] + b["wo"]
  assert_rel_close(y, want, RTOL["float32"], "geglu")
