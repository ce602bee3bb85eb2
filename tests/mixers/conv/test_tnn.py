"""TNN (Gated Toeplitz Unit): the parallel output against a float64 NumPy oracle that builds the
causal Toeplitz matrix explicitly, and config errors. The protocol is checked by
tests/mixers/test_protocol.py.
"""

import jax
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.testing import RTOL, assert_rel_close

TOL = RTOL["float32"]


def _silu(a):
  return a / (1.0 + np.exp(-a))


def _layer_norm(a, scale, bias):
  mu = a.mean(-1, keepdims=True)
  return (a - mu) / np.sqrt(a.var(-1, keepdims=True) + 1e-5) * scale + bias


def _rpe(p, s, n_layers):
  """RPE(s) [E] of one integer lag s."""
  a = s * p["w_pos"][0] + p["b_pos"]
  for i in range(n_layers):
    a = a + _silu(_layer_norm(a, p[f"ln_scale_{i}"], p[f"ln_bias_{i}"])) @ p[f"w_{i}"] + p[f"b_{i}"]
  return (_silu(_layer_norm(a, p[f"ln_scale_{n_layers}"], p[f"ln_bias_{n_layers}"]))
          @ p["w_out"] + p["b_out"])


def tnn_oracle(p, x, *, l_max, n_layers, lam):
  """(u ⊙ T v) W_o with the explicit Toeplitz matrix T[i, j] = λ^{i-j} RPE(i-j), 0 <= i-j < L."""
  b, t, _ = x.shape
  uv = _silu(x @ p["uv_proj"]["kernel"] + p["uv_proj"]["bias"])
  u, v = np.split(uv, 2, axis=-1)
  e = v.shape[-1]
  toeplitz = np.zeros((t, t, e))
  for i in range(t):
    for j in range(i + 1):
      if i - j < l_max:
        toeplitz[i, j] = lam ** (i - j) * _rpe(p["rpe"], i - j, n_layers)
  o = np.einsum("ije,bje->bie", toeplitz, v)
  return (u * o) @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]


@pytest.mark.parametrize("t,l_max,expand", [(12, 64, 1), (40, 48, 2), (20, 8, 1)])
def test_matches_direct_formula(t, l_max, expand):
  m = mt.build("tnn", l_max=l_max, expand_ratio=expand)
  x, p64, y, _ = mt.oracle_setup(m, t=t)
  want = tnn_oracle(p64, x, l_max=l_max, n_layers=2, lam=0.99)
  assert_rel_close(y, want, TOL, "tnn vs oracle")


def test_learned_decay_matches_direct_formula():
  m = mt.build("tnn", learn_decay=True)
  x, p64, y, _ = mt.oracle_setup(m, t=10)
  lam = 1.0 / (1.0 + np.exp(-p64["decay_logit"]))                   # per channel [E]
  want = tnn_oracle(p64, x, l_max=64, n_layers=2, lam=lam)
  assert_rel_close(y, want, TOL, "tnn learned decay vs oracle")


@pytest.mark.parametrize("kw,match", [
    ({"decay": 1.5}, "decay=1.5"), ({"decay": 0.0}, "decay=0.0"),
    ({"activation": "tanh"}, "activation='tanh'"), ({"l_max": 0}, "l_max=0"),
    ({"expand_ratio": 0}, "expand_ratio=0"),
])
def test_bad_config_raises(kw, match):
  m = mt.build("tnn", **kw)
  with pytest.raises(ValueError, match=match):
    m.init(jax.random.key(0), mt.random_inputs(0, 1, 4))
