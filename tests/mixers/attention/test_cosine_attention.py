"""Cosine attention: against a float64 loop (L2-normalised heads, clamped learned scale, RoPE,
causal softmax), the clamp at log 100, decoding == parallel, config errors."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.cosine_attention import CosineAttention
from seqmix.testing import RTOL, assert_rel_close

from _remapped_oracle import rope64


def _oracle(params, x):
  p = {n: np.asarray(v["kernel"], np.float64) for n, v in params.items() if n != "logit_scale"}
  s = np.asarray(params["logit_scale"], np.float64)
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  q = np.einsum("btd,dhk->bthk", x, p["q_proj"])
  k = np.einsum("btd,dgk->btgk", x, p["k_proj"])
  v = np.einsum("btd,dgk->btgk", x, p["v_proj"])
  h, g = q.shape[2], k.shape[2]
  o = np.zeros(q.shape)
  for bi in range(b):
    for hi in range(h):
      tau = math.exp(min(s[hi], math.log(100.0)))
      for i in range(t):
        qi = rope64(q[bi, i, hi] / np.linalg.norm(q[bi, i, hi]), i)
        l = np.array([tau * qi @ rope64(k[bi, j, hi // (h // g)]
                                        / np.linalg.norm(k[bi, j, hi // (h // g)]), j)
                      for j in range(i + 1)])
        w = np.exp(l - l.max())
        o[bi, i, hi] = (w[:, None] * v[bi, :i + 1, hi // (h // g)]).sum(0) / w.sum()
  return np.einsum("bthk,hkd->btd", o, p["o_proj"])


@pytest.mark.parametrize("log_scale", [math.log(10.0), 6.0])   # 6 > log 100: clamped
def test_matches_formula_and_decodes(log_scale):
  mod = CosineAttention(d_model=32, num_heads=4, num_kv_heads=2, init_log_scale=log_scale)
  params = mt.init_params(mod)
  params = dict(params, logit_scale=params["logit_scale"] + jnp.asarray([0., .5, -1., .2]))
  run = mt.Runner(mod, params)
  x = mt.random_inputs(4, 2, 12)
  y, _ = run(x)
  assert_rel_close(y, _oracle(params, x), RTOL["float32"])
  assert_rel_close(run.decode(x), y, RTOL["float32"])
  assert_rel_close(run.decode(x, chunks=[5, 7]), y, RTOL["float32"])


def test_bad_config():
  with pytest.raises(ValueError, match="qk_norm=True"):
    CosineAttention(d_model=32, num_heads=4, qk_norm=True).init_cache(1, 4)
