"""Learned absolute positions: lookup, and positions beyond max_len are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.positional.learned import LearnedPositionEmbedding


def test_lookup_and_range_errors():
  mod = LearnedPositionEmbedding(max_len=16, features=8)
  pos = jnp.array([[0, 3, 15], [1, 1, 2]])
  params = mod.init(jax.random.PRNGKey(0), pos)
  table = np.asarray(params["params"]["embedding"].unbox())
  np.testing.assert_array_equal(mod.apply(params, pos), table[np.asarray(pos)])
  np.testing.assert_array_equal(mod.apply(params, length=4)[0], table[:4])
  with pytest.raises(ValueError, match="max_len=16"):
    mod.apply(params, jnp.array([[14, 15, 16]]))
  with pytest.raises(ValueError, match="max_len=16"):
    mod.apply(params, length=17)
  # Under jit the check cannot raise: the out-of-range row is NaN, never a clamped row.
  out = jax.jit(mod.apply)(params, jnp.array([[15, 16]]))
  assert np.all(np.isfinite(out[0, 0])) and np.all(np.isnan(out[0, 1]))
