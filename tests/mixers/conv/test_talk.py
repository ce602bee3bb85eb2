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


@pytest.mark.parametrize("form", ["prefix_sum", "kernel"])
def test_both_parallel_forms_match_the_formula(form):
  m = mt.build("talk", parallel_form=form)
  x, p64, y, _ = mt.oracle_setup(m, t=9)
  assert_rel_close(y, oracle(p64, x, l_max=5, heads=4), TOL, f"talk {form} vs prefix sums")


def test_prefix_sum_form_isolates_documents():
  """Packed documents through the prefix-sum form == the kernel form (which masks taps)."""
  fast, slow = mt.build("talk"), mt.build("talk", parallel_form="kernel")
  x = mt.random_inputs(0, 2, 13)
  params = mt.init_params(fast, x)
  seg, _ = mt.packed_pair(x, 4)
  y_fast, _ = jax.jit(fast.apply)({"params": params}, x, segment_ids=seg)
  y_slow, _ = jax.jit(slow.apply)({"params": params}, x, segment_ids=seg)
  assert_rel_close(y_fast, y_slow, TOL, "prefix-sum vs kernel form, packed")


def test_prefix_sum_form_gradients_match_kernel_form():
  """The offsets get the same gradient through the interpolated prefix sums as through the
  kernel's fractional edge tap (and the normaliser)."""
  fast, slow = mt.build("talk"), mt.build("talk", parallel_form="kernel")
  x = mt.random_inputs(1, 2, 11)
  params = mt.init_params(fast, x)
  cot = mt.random_inputs(2, 2, 11)

  def grads(m):
    return jax.jit(jax.grad(lambda p: (m.apply({"params": p}, x)[0] * cot).sum()))(params)

  g_fast, g_slow = grads(fast), grads(slow)
  for key in ("offset", "linear1", "linear2"):
    assert_rel_close(g_fast[key]["kernel"], g_slow[key]["kernel"], TOL, f"grad {key}")


def test_bad_parallel_form_raises():
  m = mt.build("talk", parallel_form="sat")
  with pytest.raises(ValueError, match="parallel_form='sat'"):
    m.init(jax.random.key(0), mt.random_inputs(0, 1, 4))
