"""KERPLE log and power kernels against their float64 formulas."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from seqmix.positional import base

Q_POS = np.array([[1000, 1005, 1039]])
K_POS = np.array([[1000, 1001, 1004, 1005, 1020, 1039]])


def _bias(name, r1, r2):
  comp = base.build(name, num_heads=3, head_dim=8, module_name=None)
  p = {"params": {"r1": np.asarray(r1, np.float32), "r2": np.asarray(r2, np.float32)}}
  return np.asarray(comp.apply(p, None, None, Q_POS, K_POS, method="bias"), np.float64)


def _dist():
  return np.abs(Q_POS[0][:, None] - K_POS[0][None, :]).astype(np.float64)


def test_log_kernel():
  r1, r2 = [0.5, 1.7, 0.001], [0.3, 0.9, 0.2]          # 0.001 is clamped to 1e-2
  got = _bias("kerple_log", r1, r2)
  for h in range(3):
    want = -max(r1[h], 1e-2) * np.log(1.0 + r2[h] * _dist())
    np.testing.assert_allclose(got[0, h], want, rtol=1e-6, atol=1e-7)


def test_power_kernel():
  r1, r2 = [0.5, 1.7, 0.2], [0.3, 1.0, 3.5]            # 3.5 is clamped to 2
  got = _bias("kerple_power", r1, r2)
  for h in range(3):
    want = -r1[h] * _dist() ** min(r2[h], 2.0)
    np.testing.assert_allclose(got[0, h], want, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["kerple_log", "kerple_power"])
def test_parameter_gradients_finite_at_zero_distance(name):
  comp = base.build(name, num_heads=2, head_dim=8, module_name=None)
  p = nn.meta.unbox(comp.init(jax.random.key(0), None, None, Q_POS, K_POS, method="bias"))
  g = jax.grad(lambda p_: comp.apply(p_, None, None, Q_POS, K_POS, method="bias").sum())(p)
  for leaf in jax.tree.leaves(g):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)
