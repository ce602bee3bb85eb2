"""RoPE: the rotate-half convention, the relative-position property, partial rotary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.positional import rope


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _pos(p, t=1):
  return jnp.full((1, t), p, jnp.int32)


def test_rotate_half_convention():
  """Channel i pairs with channel i + R/2, θ_0 = 1: e_0 at position p -> cos p e_0 + sin p e_2."""
  x = jnp.zeros((1, 1, 1, 4)).at[..., 0].set(1.0)
  y = np.asarray(rope.apply_rope(x, _pos(3)))[0, 0, 0]
  np.testing.assert_allclose(y, [np.cos(3.0), 0.0, np.sin(3.0), 0.0], atol=1e-6)
  x = jnp.zeros((1, 1, 1, 4)).at[..., 1].set(1.0)   # θ_1 = base^(−2/4) = 0.01
  y = np.asarray(rope.apply_rope(x, _pos(3)))[0, 0, 0]
  np.testing.assert_allclose(y, [0.0, np.cos(0.03), 0.0, np.sin(0.03)], atol=1e-6)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_dot_product_depends_on_relative_position_only(fraction):
  q, k = _x((1, 1, 1, 60), 1), _x((1, 1, 1, 60), 2)

  def dot(m, n):
    a = rope.apply_rope(q, _pos(m), base=500.0, fraction=fraction)
    b = rope.apply_rope(k, _pos(n), base=500.0, fraction=fraction)
    return float(jnp.sum(a * b))

  same_gap = [dot(m, m - 5) for m in (5, 17, 300, 4000)]
  # Wider than float32's 1e-5: the angle p·θ is rounded in float32, by up to ulp(4000)/2 ≈
  # 2.4e-4 rad at p = 4000, so the two rotated vectors shift by a relative ~1e-4 at worst
  # (3e-5 observed); the exact maths gives equal values.
  np.testing.assert_allclose(same_gap, same_gap[0], rtol=1e-4)
  assert abs(dot(20, 15) - dot(20, 14)) > 1e-3   # a different gap changes the score


def test_partial_rotary_passes_channels_through_and_keeps_norms():
  x = _x((2, 5, 3, 60))
  pos = jnp.asarray(np.random.default_rng(3).integers(0, 1000, (2, 5)), jnp.int32)
  y = rope.apply_rope(x, pos, fraction=0.5)
  assert rope.rotary_dim(60, 0.5) == 30
  np.testing.assert_array_equal(np.asarray(y[..., 30:]), np.asarray(x[..., 30:]))
  assert not np.allclose(np.asarray(y[..., :30]), np.asarray(x[..., :30]))
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(rope.apply_rope(x, jnp.zeros((2, 5), jnp.int32)), x, atol=1e-7)


def test_bfloat16_in_bfloat16_out():
  x = _x((1, 4, 2, 8)).astype(jnp.bfloat16)
  y = jax.jit(rope.apply_rope)(x, jnp.arange(4)[None])
  assert y.dtype == jnp.bfloat16


def test_bad_fraction_and_shapes():
  with pytest.raises(ValueError, match="fraction"):
    rope.rotary_dim(64, 0.0)
  with pytest.raises(ValueError, match="no channel pair"):
    rope.rotary_dim(64, 0.01)
  with pytest.raises(ValueError, match="positions"):
    rope.apply_rope(_x((1, 4, 2, 8)), jnp.arange(3)[None])
