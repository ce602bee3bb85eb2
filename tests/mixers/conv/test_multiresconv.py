"""MultiresConv: the parallel output against a float64 NumPy loop of the left-padded dilated
cross-correlations down the tree, and config errors. The protocol is checked by
tests/mixers/test_protocol.py.
"""

import math

import jax
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.testing import RTOL, assert_rel_close

TOL = RTOL["float32"]


def _xcorr(u, h, dil):
  """out_t = Σ_i h_i u_{t - dil(K-1-i)} (zero before the start): u [B, T, D], h [D, K]."""
  b, t, d = u.shape
  k = h.shape[1]
  out = np.zeros_like(u)
  for i in range(t):
    for j in range(k):
      src = i - dil * (k - 1 - j)
      if src >= 0:
        out[:, i] += h[:, j] * u[:, src]
  return out


def _gelu(a):  # jax.nn.gelu's default tanh approximation
  return 0.5 * a * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a ** 3)))


def oracle(p, x, depth):
  w = p["w"]
  lo, z = x, w[:, depth + 1] * x
  for j in range(depth):
    dil = 2 ** j
    z = z + w[:, depth - j] * _xcorr(lo, p["h1"], dil)
    lo = _xcorr(lo, p["h0"], dil)
  z = z + w[:, 0] * lo
  o = _gelu(z) @ p["output"]["out_proj"]["kernel"] + p["output"]["out_proj"]["bias"]
  d = x.shape[-1]
  return o[..., :d] / (1.0 + np.exp(-o[..., d:]))


@pytest.mark.parametrize("k,depth,t", [(2, 3, 13), (3, 4, 40)])
def test_matches_direct_formula(k, depth, t):
  m = mt.build("multiresconv", kernel_size=k, depth=depth)
  x, p64, y, _ = mt.oracle_setup(m, t=t)
  assert_rel_close(y, oracle(p64, x, depth), TOL, "multiresconv vs oracle")


@pytest.mark.parametrize("kw,match", [({"kernel_size": 1}, "kernel_size=1"),
                                      ({"depth": 0}, "depth=0")])
def test_bad_config_raises(kw, match):
  m = mt.build("multiresconv", **kw)
  with pytest.raises(ValueError, match=match):
    m.init(jax.random.key(0), mt.random_inputs(0, 1, 4))
