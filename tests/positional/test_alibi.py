"""ALiBi slopes (the paper's values) and the bias builder."""

import numpy as np
import pytest

from seqmix.positional import alibi


def test_slopes_eight_heads():
  np.testing.assert_allclose(alibi.alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])


def test_slopes_non_power_of_two():
  # 6 heads: the 4-head slopes (2^-2, 2^-4, 2^-6, 2^-8), then every other 8-head slope
  # (2^-1, 2^-3, ...) for the remaining two heads.
  np.testing.assert_allclose(alibi.alibi_slopes(6), [2.0 ** -e for e in (2, 4, 6, 8, 1, 3)])
  # 12 heads: the 8-head slopes, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 from the 16-head sequence.
  np.testing.assert_allclose(alibi.alibi_slopes(12)[8:], [2.0 ** -(e + 0.5) for e in range(4)],
                             rtol=1e-6)
  np.testing.assert_allclose(alibi.alibi_slopes(1), [2.0 ** -8])
  with pytest.raises(ValueError):
    alibi.alibi_slopes(0)


def test_bias_values_and_shapes():
  slopes = alibi.alibi_slopes(4)
  q_pos = np.array([[10, 11, 12]])
  k_pos = np.array([[7, 8, 9, 10, 11, 12]])
  b = np.asarray(alibi.alibi_bias(slopes, q_pos, k_pos))
  assert b.shape == (1, 4, 3, 6)
  for h in range(4):
    for i in range(3):
      for j in range(6):
        assert b[0, h, i, j] == pytest.approx(-slopes[h] * abs(q_pos[0, i] - k_pos[0, j]))
  assert alibi.alibi_bias(slopes, np.arange(3), np.arange(5)).shape == (1, 4, 3, 5)
