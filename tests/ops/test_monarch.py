"""seqmix.ops.monarch (the DFT as a Monarch product) and causal_conv(impl="monarch")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops import monarch
from seqmix.ops.conv import causal_conv
from seqmix.testing import assert_rel_close


@pytest.mark.parametrize("n", [1, 2, 8, 32])
def test_factors_multiply_to_the_dft_matrix(n):
  """P_out R Tw L P_in == F_n entrywise (float64), L and R block diagonal with DFT blocks."""
  p_in, left, tw, right, p_out = monarch.monarch_factors(n)
  j = np.arange(n)
  f = np.exp(-2j * np.pi * np.outer(j, j) / n)
  np.testing.assert_allclose(p_out @ right @ tw @ left @ p_in, f, atol=1e-12)
  n1, n2 = monarch.split_size(n)
  blocks = [left[i * n1:(i + 1) * n1, i * n1:(i + 1) * n1] for i in range(n2)]
  assert np.count_nonzero(left) == sum(np.count_nonzero(b) for b in blocks)  # block diagonal


@pytest.mark.parametrize("n", [4, 16, 128])
def test_dft_matches_numpy_fft(n):
  x = np.random.default_rng(0).standard_normal((2, n, 3))
  got = monarch.monarch_dft(jnp.asarray(x, jnp.float32), axis=1)
  assert_rel_close(np.asarray(got), np.fft.fft(x, axis=1), 1e-5, "monarch dft")
  back = monarch.monarch_idft(got, axis=1)
  assert_rel_close(np.asarray(back).real, x, 1e-5, "monarch idft")


def test_split_size_rejects_non_powers_of_two():
  with pytest.raises(ValueError, match="n=12 must be a power of two"):
    monarch.split_size(12)


@pytest.mark.parametrize("taps,t,init", [(40, 40, False), (7, 13, True), (64, 1, True)])
def test_causal_conv_monarch_matches_reference(taps, t, init):
  """Output, state and gradients (u, k, initial state) of impl="monarch" == impl="reference"."""
  rng = np.random.default_rng(1)
  u = jnp.asarray(rng.standard_normal((2, t, 5)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((taps, 5)), jnp.float32)
  s0 = jnp.asarray(rng.standard_normal((2, taps - 1, 5)), jnp.float32) if init else None
  cot = jnp.asarray(rng.standard_normal((2, t, 5)), jnp.float32)

  def run(impl):
    def f(u_, k_, s_):
      y, st = causal_conv(u_, k_, initial_state=s_, impl=impl)
      return jnp.sum(y * cot) + jnp.sum(jnp.sin(st)), (y, st)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(u, k, s0)

  (_, (y_m, s_m)), g_m = run("monarch")
  (_, (y_r, s_r)), g_r = run("reference")
  assert_rel_close(y_m, y_r, 1e-5, "monarch output")
  np.testing.assert_array_equal(np.asarray(s_m), np.asarray(s_r))
  for a, b, name in zip(g_m, g_r, ("u", "k", "initial_state")):
    if b is not None:
      assert_rel_close(a, b, 1e-5, f"monarch grad {name}")
