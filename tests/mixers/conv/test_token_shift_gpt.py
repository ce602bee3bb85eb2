"""Token Shift GPT: the parallel output against a float64 NumPy loop over the pooled windows,
the pool kernels, and config errors. The protocol is checked by tests/mixers/test_protocol.py.
"""

import math

import jax
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.testing import RTOL, assert_rel_close

TOL = RTOL["float32"]


def _gelu(a):
  return 0.5 * a * (1.0 + np.vectorize(math.erf)(a / math.sqrt(2.0)))


def _dense(p, a):
  return a @ p["kernel"] + p["bias"]


def oracle(p, x, num_shifts):
  h = _gelu(_dense(p["project_in"], x))
  a, g = np.split(h, 2, axis=-1)
  mu, var = g.mean(-1, keepdims=True), g.var(-1, keepdims=True)
  g = (g - mu) / np.sqrt(var + 1e-5) * p["gate_norm"]["scale"] + p["gate_norm"]["bias"]
  c = g.shape[-1] // (num_shifts + 1)
  shifted = g.copy()
  for i in range(num_shifts):
    w = 2 ** i
    for t in range(x.shape[1]):
      window = [j for j in range(t - 2 * w + 1, t - w + 1) if j >= 0]   # the 2^i-long segment
      sl = slice(i * c, (i + 1) * c)
      shifted[:, t, sl] = g[:, window, sl].mean(1) if window else 0.0
  return _dense(p["project_out"], a * _dense(p["to_gate"], shifted))


@pytest.mark.parametrize("t,num_shifts", [(13, 3), (40, 5)])
def test_matches_direct_formula(t, num_shifts):
  m = mt.build("token_shift_gpt", num_shifts=num_shifts, mult=6 if num_shifts == 5 else 4)
  x, p64, y, _ = mt.oracle_setup(m, t=t)
  assert_rel_close(y, oracle(p64, x, num_shifts), TOL, "token_shift_gpt vs oracle")


@pytest.mark.parametrize("kw,match", [({"num_shifts": 4}, "divisible by num_shifts\\+1 = 5"),
                                      ({"num_shifts": 0}, "num_shifts=0")])
def test_bad_config_raises(kw, match):
  m = mt.build("token_shift_gpt", **kw)
  with pytest.raises(ValueError, match=match):
    m.init(jax.random.key(0), mt.random_inputs(0, 1, 4))
