"""Numerical comparison helpers shared by the tests (and usable from notebooks).

The metric is the relative error ‖a − b‖ / ‖b‖ computed in float64 on the host, plus a
check that neither side holds NaN/Inf where the other does not.
"""

import jax
import numpy as np

# Default relative tolerances by dtype (DESIGN.md, "Numerical discipline").
RTOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}


def rel_err(a, b) -> float:
  """‖a − b‖ / ‖b‖ (0 when both are 0)."""
  a = np.asarray(jax.device_get(a), dtype=np.complex128 if np.iscomplexobj(a) else np.float64)
  b = np.asarray(jax.device_get(b), dtype=a.dtype)
  nb = np.linalg.norm(b.ravel())
  na = np.linalg.norm((a - b).ravel())
  return float(na / nb) if nb > 0 else float(na)


def assert_rel_close(a, b, rtol: float, name: str = "value"):
  """Fail unless shapes match, both are finite, and rel_err(a, b) <= rtol."""
  a_np, b_np = np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b))
  assert a_np.shape == b_np.shape, f"{name}: shape {a_np.shape} != {b_np.shape}"
  assert np.all(np.isfinite(a_np)), f"{name}: non-finite entries in the tested value"
  assert np.all(np.isfinite(b_np)), f"{name}: non-finite entries in the reference"
  err = rel_err(a_np, b_np)
  assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}"


def assert_trees_rel_close(a, b, rtol: float, name: str = "tree"):
  """assert_rel_close leaf by leaf (None leaves must match)."""
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb, f"{name}: tree structures differ: {ta} vs {tb}"
  for (path, x), (_, y) in zip(la, lb):
    assert_rel_close(x, y, rtol, f"{name}{jax.tree_util.keystr(path)}")
