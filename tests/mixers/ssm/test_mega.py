"""Mega mixer: the official EMA initialisation, the whole layer against a float64 NumPy
transcription that computes the EMA through its convolution kernel (the paper's training form;
the mixer uses the recurrence), key/value width padding, and configuration errors. (Causality,
decoding, prefill, segments and gradients are the shared protocol tests.)"""

import flax.linen as nn
import jax
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.ssm import mega as mega_mod
from seqmix.testing import assert_rel_close

D = mt.D_MODEL


def test_ema_init_matches_official():
  m = mega_mod.Mega(d_model=D, ema_dim=6, z_dim=8, max_positions=16)
  p = nn.meta.unbox(jax.jit(m.init)(jax.random.key(0), mt.random_inputs(0, 1, 3))["params"])
  beta = np.asarray(p["ema_beta"])                                 # [d, n]
  sign = np.array([1, -1, 1, -1, 1, -1], np.float32)
  # β = sign + N(0, 0.02²): 192 draws, all within 5 sd of their sign.
  assert np.all(np.abs(beta - sign) < 0.1)
  decay = 1 - jax.nn.sigmoid(p["ema_alpha"]) * jax.nn.sigmoid(p["ema_delta"])
  assert np.all((np.asarray(decay) > 0) & (np.asarray(decay) < 1))
  assert not np.any(np.asarray(p["qk_beta"])) and not np.any(np.asarray(p["v_proj"]["bias"]))
  assert p["v_proj"]["kernel"].shape == (D, 2 * D)   # h_dim defaults to 2·d_model


def _silu(a):
  return a / (1 + np.exp(-a))


def _mega_direct(p, x, n, s, e):
  """float64 Mega layer; the EMA through its kernel K[l, d] = Σ_n αβ (1−αδ)^l η / √N."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, t, d = x.shape
  sig = lambda a: 1 / (1 + np.exp(-a))
  alpha, delta = sig(p["ema_alpha"]), sig(p["ema_delta"])
  lags = np.arange(t)[:, None, None]
  kernel = np.sum(alpha * p["ema_beta"] * (1 - alpha * delta) ** lags * p["ema_eta"], -1)
  kernel /= np.sqrt(n)                                               # [t, d]
  ema = np.zeros_like(x)
  for j in range(t):
    ema[:, j] = sum(kernel[j - i] * x[:, i] for i in range(j + 1))
  mx = _silu(ema + x * p["ema_omega"])
  dense = lambda a, q: a @ q["kernel"] + q["bias"]
  v = _silu(dense(x, p["v_proj"]))
  base = dense(mx, p["mx_proj"])
  u, zr, hx = base[..., :d], base[..., d:d + s + e], base[..., d + s + e:]
  z, r = _silu(zr[..., :s]), _silu(zr[..., s:])
  q = z * p["qk_gamma"][0] + p["qk_beta"][0]
  k = z * p["qk_gamma"][1] + p["qk_beta"][1]
  lag = np.arange(t)[:, None] - np.arange(t)[None]
  logits = np.einsum("bis,bjs->bij", q, k) / np.sqrt(s)
  logits = logits + p["rel_pos_bias"][np.clip(lag, 0, None)]
  logits = np.where(lag >= 0, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  o = np.einsum("bij,bje->bie", w / w.sum(-1, keepdims=True), v)
  h = _silu(hx + dense(o * r, p["h_proj"]))
  return sig(u) * (h - x)


@pytest.mark.parametrize("z_dim,h_dim,impl", [(16, 48, "xla"), (24, 8, "reference")])
def test_mega_matches_direct_formula(z_dim, h_dim, impl):
  """Both padding directions (v padded up to z_dim, q/k padded up to h_dim), through an impl
  that needs equal widths (xla) and one that does not."""
  m = mega_mod.Mega(d_model=D, ema_dim=4, z_dim=z_dim, h_dim=h_dim, max_positions=16,
                    impl=impl)
  x = mt.random_inputs(1, 2, 12)
  p = mt.random_params(m, x, std=0.3)
  y, _ = jax.jit(m.apply)({"params": p}, x)
  assert_rel_close(y, _mega_direct(p, x, 4, z_dim, h_dim), 1e-5, "mega vs direct")


def test_mega_bad_config_errors():
  x = mt.random_inputs(0, 1, 3)
  with pytest.raises(ValueError, match="z_dim=0 must be >= 1"):
    mega_mod.Mega(d_model=D, z_dim=0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="rel_pos='rotary' is not one of"):
    mega_mod.Mega(d_model=D, rel_pos="rotary").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="max_len=32 exceeds max_positions=16"):
    mega_mod.Mega(d_model=D, max_positions=16).init_cache(1, 32)
  with pytest.raises(ValueError, match="sequence length=20 exceeds max_positions=16"):
    mega_mod.Mega(d_model=D, max_positions=16).init(jax.random.key(0), mt.random_inputs(0, 1, 20))


def test_mega_without_rel_pos_decodes():
  m = mega_mod.Mega(d_model=D, ema_dim=2, z_dim=8, h_dim=16, rel_pos="none")
  runner = mt.Runner(m, mt.init_params(m))
  mt.check_split_prefill(runner, mt.random_inputs(2, 2, 9), 4)
