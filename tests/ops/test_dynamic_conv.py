"""seqmix.ops.conv.dynamic_causal_conv: a per-step kernel, against an explicit loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops.conv import dynamic_causal_conv
from seqmix.testing import assert_rel_close


@pytest.mark.parametrize("taps,t,init", [(1, 5, False), (4, 9, True), (6, 3, True)])
def test_matches_loop(taps, t, init):
  rng = np.random.default_rng(0)
  u = rng.standard_normal((2, t, 3))
  k = rng.standard_normal((2, t, taps, 3))
  s0 = rng.standard_normal((2, taps - 1, 3)) if init else np.zeros((2, taps - 1, 3))
  y, state = dynamic_causal_conv(jnp.asarray(u, jnp.float32), jnp.asarray(k, jnp.float32),
                                 initial_state=jnp.asarray(s0, jnp.float32) if init else None)
  full = np.concatenate([s0, u], axis=1)
  want = np.zeros_like(u)
  for i in range(t):
    for s in range(taps):
      want[:, i] += k[:, i, s] * full[:, taps - 1 + i - s]
  assert_rel_close(y, want, 1e-6, "dynamic conv")
  np.testing.assert_array_equal(np.asarray(state),
                                full[:, full.shape[1] - (taps - 1):].astype(np.float32))


def test_bad_kernel_shape_raises():
  with pytest.raises(ValueError, match="k must be \\[B, T, L, D\\]"):
    dynamic_causal_conv(jnp.zeros((1, 4, 3)), jnp.zeros((4, 2, 3)))
