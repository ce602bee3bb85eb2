"""TaLK: the parallel output against the paper's prefix-sum form in float64 NumPy (window sums
S(t) - S(t - a - 1) with S linearly interpolated at fractional positions), and config errors.
The protocol is checked by tests/mixers/test_protocol.py.
"""

import math

import jax
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.testing import RTOL, assert_rel_close
from test_lightconv import _glu_in  # same directory (pytest prepends it to sys.path)

TOL = RTOL["float32"]


def _prefix(s_int, p):
  """S(p): the integer prefix sums S(q) = Σ_{j<=q} u_j (0 for q < 0), linear in between."""
  def at(q):
    return s_int[:, q] if q >= 0 else np.zeros_like(s_int[:, 0])
  lo = math.floor(p)
  return at(lo) + (p - lo) * (at(lo + 1) - at(lo))


def oracle(p, x, *, l_max, heads):
  u = _glu_in(p, x)
  b, t, d = u.shape
  a = 1.0 / (1.0 + np.exp(-(u @ p["offset"]["kernel"] + p["offset"]["bias"]))) * l_max
  s_int = np.cumsum(u, axis=1)
  o = np.zeros_like(u)
  r = d // heads
  for bi in range(b):
    for i in range(t):
      for h in range(heads):
        ah = a[bi, i, h]
        sl = slice(h * r, (h + 1) * r)
        win = s_int[bi:bi + 1, i] - _prefix(s_int[bi:bi + 1], i - ah - 1)
        o[bi, i, sl] = win[0, sl] / (ah + 1.0)
  return o @ p["linear2"]["kernel"] + p["linear2"]["bias"]


@pytest.mark.parametrize("k,t", [(6, 12), (3, 7)])
def test_matches_prefix_sum_formula(k, t):
  m = mt.build("talk", kernel_size=k)
  x, p64, y, _ = mt.oracle_setup(m, t=t)
  assert_rel_close(y, oracle(p64, x, l_max=k - 1, heads=4), TOL, "talk vs prefix sums")


def test_bad_config_raises():
  m = mt.build("talk", kernel_size=1)
  with pytest.raises(ValueError, match="kernel_size=1 must be >= 2"):
    m.init(jax.random.key(0), mt.random_inputs(0, 1, 4))
