"""T5 relative bias: buckets and values against a plain-Python transcription of the formula."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.positional import base, t5


def _bucket64(n, num_buckets, max_distance):
  n = max(n, 0)
  exact = num_buckets // 2
  if n < exact:
    return n
  return min(exact + int(math.log(n / exact) / math.log(max_distance / exact)
                         * (num_buckets - exact)), num_buckets - 1)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_buckets_match_formula(num_buckets, max_distance):
  d = np.arange(-5, 400)
  got = np.asarray(t5.t5_buckets(jnp.asarray(d), num_buckets, max_distance))
  want = [_bucket64(int(n), num_buckets, max_distance) for n in d]
  np.testing.assert_array_equal(got, want)
  # Spot values of the defaults: exact below 16, then log-spaced, capped at 31 from 128 on.
  assert [_bucket64(n, 32, 128) for n in (0, 15, 16, 31, 32, 64, 127, 128, 10 ** 6)] == \
      [0, 15, 16, 21, 21, 26, 31, 31, 31]


def test_bias_is_table_lookup_of_bucket():
  comp = base.build("t5", num_heads=3, head_dim=8, kwargs={"num_buckets": 8, "max_distance": 20},
                    module_name=None)
  q_pos = np.array([[1000, 1003, 1030]])
  k_pos = np.array([[990, 1000, 1001, 1002, 1003, 1030]])
  params = nn.meta.unbox(comp.init(jax.random.key(0), None, None, q_pos, k_pos, method="bias"))
  table = np.asarray(params["params"]["rel_bias"], np.float64)
  got = np.asarray(comp.apply(params, None, None, q_pos, k_pos, method="bias"))
  assert got.shape == (1, 3, 3, 6)
  for h in range(3):
    for i in range(3):
      for j in range(6):
        want = table[_bucket64(int(q_pos[0, i] - k_pos[0, j]), 8, 20), h]
        assert got[0, h, i, j] == want


def test_bad_config():
  comp = base.build("t5", num_heads=2, head_dim=8, kwargs={"max_distance": 10}, module_name=None)
  with pytest.raises(ValueError, match="max_distance=10"):
    comp.init(jax.random.key(0), None, None, np.zeros((1, 2)), np.zeros((1, 2)), method="bias")
  with pytest.raises(ValueError, match=r"\['buckets'\] are not options of position='t5'"):
    base.build("t5", num_heads=2, head_dim=8, kwargs={"buckets": 3})
