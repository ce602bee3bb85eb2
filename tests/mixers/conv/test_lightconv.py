"""LightConv / DynamicConv: the parallel output against a float64 NumPy loop written in the
paper's (fairseq's) left-padded form y_t = Σ_j w_j u_{t-K+1+j}, and config errors. The protocol
is checked by tests/mixers/test_protocol.py.
"""

import jax
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.testing import RTOL, assert_rel_close

TOL = RTOL["float32"]


def _softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _glu_in(p, x):
  ag = x @ p["linear1"]["kernel"] + p["linear1"]["bias"]
  a, g = np.split(ag, 2, axis=-1)
  return a / (1.0 + np.exp(-g))


def conv_oracle(p, x, *, kernel_size, heads, dynamic):
  u = _glu_in(p, x)
  b, t, d = u.shape
  r = d // heads
  y = np.zeros_like(u)
  for bi in range(b):
    for i in range(t):
      if dynamic:
        logits = u[bi, i] @ p["weight_linear"]["kernel"] + p["weight_linear"]["bias"]
        w = _softmax(logits.reshape(heads, kernel_size))
      else:
        w = _softmax(p["weight"])
      for c in range(d):
        for j in range(kernel_size):
          src = i - kernel_size + 1 + j
          if src >= 0:
            y[bi, i, c] += w[c // r, j] * u[bi, src, c]
  return y @ p["linear2"]["kernel"] + p["linear2"]["bias"]


@pytest.mark.parametrize("name,k,t", [("lightconv", 4, 12), ("lightconv", 40, 36),
                                      ("dynamicconv", 4, 12), ("dynamicconv", 7, 5)])
def test_matches_direct_formula(name, k, t):
  m = mt.build(name, kernel_size=k)
  x, p64, y, _ = mt.oracle_setup(m, t=t)
  want = conv_oracle(p64, x, kernel_size=k, heads=4, dynamic=name == "dynamicconv")
  assert_rel_close(y, want, TOL, f"{name} vs oracle")


@pytest.mark.parametrize("name", ["lightconv", "dynamicconv"])
@pytest.mark.parametrize("kw,match", [({"num_heads": 5}, "d_model=32 must be divisible by "
                                                         "num_heads=5"),
                                      ({"kernel_size": 0}, "kernel_size=0")])
def test_bad_config_raises(name, kw, match):
  m = mt.build(name, **kw)
  with pytest.raises(ValueError, match=match):
    m.init(jax.random.key(0), mt.random_inputs(0, 1, 4))
