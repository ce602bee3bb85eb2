"""Sandwich against its float64 formula (a sum of cosines of the distance)."""

import numpy as np

from seqmix.positional import base


def test_sandwich_matches_formula():
  q_pos = np.array([[1000, 1007, 1039]])
  k_pos = np.array([[1000, 1003, 1007, 1020, 1039]])
  comp = base.build("sandwich", num_heads=4, head_dim=8, kwargs={"dim": 16}, module_name=None)
  got = np.asarray(comp.apply({}, None, None, q_pos, k_pos, method="bias"), np.float64)
  want = np.zeros((4, 3, 5))
  for h in range(4):
    for i in range(3):
      for j in range(5):
        d = q_pos[0, i] - k_pos[0, j]
        s = sum(np.cos(d / 10000 ** (2 * kk / 16)) for kk in range(1, 9)) - 8
        want[h, i, j] = s / (8 * (h + 1) / 4)
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
  assert np.all(got <= 1e-6) and np.all(got[0, :, 0, 0] == 0)
