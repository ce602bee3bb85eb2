"""selective_scan's `reset` ([B, T] bool: the state is zeroed before token t) in every impl.

The oracle for `reference` is a float64 numpy loop; `chunked` and `pallas` (interpreted on CPU)
are checked against `reference` on outputs, final state and the gradients of every input.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops.ssm import selective_scan
from seqmix.testing import RTOL, assert_rel_close

B, D, N = 2, 6, 4
F32 = RTOL["float32"]
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias", "initial_state")


def _inputs(seed, t):
  rng = np.random.default_rng(seed)
  vals = dict(u=rng.normal(size=(B, t, D)), delta=rng.normal(size=(B, t, D)) - 1.0,
              A=-np.exp(rng.normal(size=(D, N))), B=rng.normal(size=(B, t, N)),
              C=rng.normal(size=(B, t, N)), D=rng.normal(size=(D,)),
              delta_bias=rng.normal(size=(D,)) * 0.5, initial_state=rng.normal(size=(B, D, N)))
  reset = rng.random((B, t)) < 0.15
  reset[0, 0] = True   # a reset at t = 0 discards the initial state of row 0
  reset[1, t - 1] = True  # and one at the last token
  return {k: jnp.asarray(v, jnp.float32) for k, v in vals.items()}, jnp.asarray(reset)


def _numpy_loop(inp, reset, softplus):
  v = {k: np.asarray(x, np.float64) for k, x in inp.items()}
  dt = v["delta"] + v["delta_bias"]
  dt = np.logaddexp(dt, 0.0) if softplus else dt
  h = v["initial_state"].copy()
  ys = []
  for t in range(dt.shape[1]):
    h = np.where(np.asarray(reset)[:, t, None, None], 0.0, h)
    h = np.exp(dt[:, t, :, None] * v["A"]) * h + (dt[:, t] * v["u"][:, t])[..., None] * \
        v["B"][:, t, None, :]
    ys.append(np.einsum("bdn,bn->bd", h, v["C"][:, t]) + v["D"] * v["u"][:, t])
  return np.stack(ys, 1), h


def _run(impl, inp, reset, softplus, seed=0):
  def f(*vals):
    kw = dict(zip(NAMES, vals))
    return selective_scan(kw.pop("u"), kw.pop("delta"), kw.pop("A"), kw.pop("B"), kw.pop("C"),
                          kw.pop("D"), delta_softplus=softplus, reset=reset, chunk_size=8,
                          impl=impl, **kw)
  out, vjp = jax.vjp(f, *(inp[k] for k in NAMES))
  rng = np.random.default_rng(seed + 1)
  grads = vjp(tuple(jnp.asarray(rng.normal(size=o.shape), o.dtype) for o in out))
  return list(out), dict(zip(NAMES, grads))


@pytest.mark.parametrize("softplus", [True, False])
def test_reference_matches_float64_loop(softplus):
  inp, reset = _inputs(0, 21)
  if not softplus:  # positive steps without the softplus
    inp["delta"], inp["delta_bias"] = jnp.abs(inp["delta"]), jnp.abs(inp["delta_bias"])
  (y, h), _ = _run("reference", inp, reset, softplus)
  want_y, want_h = _numpy_loop(inp, reset, softplus)
  assert_rel_close(y, want_y, F32, "y")
  assert_rel_close(h, want_h, F32, "h_T")


def test_reset_is_not_a_no_op():
  """The resets change the result, and a reset at t = 0 removes all dependence on h0."""
  inp, reset = _inputs(1, 21)
  (y, _), grads = _run("reference", inp, reset, True)
  (y_plain, _), _ = _run("reference", inp, None, True)
  assert float(jnp.max(jnp.abs(y - y_plain))) > 1e-2
  assert float(jnp.max(jnp.abs(grads["initial_state"][0]))) == 0.0  # row 0 resets at t = 0
  assert float(jnp.max(jnp.abs(grads["initial_state"][1]))) > 0.0


@pytest.mark.parametrize("impl,t", [("chunked", 21), ("pallas", 21)])
@pytest.mark.parametrize("softplus", [True])
def test_matches_reference(impl, t, softplus):
  inp, reset = _inputs(2, t)
  out, grads = _run(impl, inp, reset, softplus)
  ref_out, ref_grads = _run("reference", inp, reset, softplus)
  assert_rel_close(out[0], ref_out[0], F32, f"{impl} y")
  assert_rel_close(out[1], ref_out[1], F32, f"{impl} h_T")
  for k in NAMES:
    assert_rel_close(grads[k], ref_grads[k], F32, f"{impl} d{k}")


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_matches_reference_no_softplus_long(impl):
  inp, reset = _inputs(3, 63)
  inp["delta"], inp["delta_bias"] = jnp.abs(inp["delta"]), jnp.abs(inp["delta_bias"])
  out, grads = _run(impl, inp, reset, False)
  ref_out, ref_grads = _run("reference", inp, reset, False)
  for name, g, w in zip(("y", "h_T"), out, ref_out):
    assert_rel_close(g, w, F32, f"{impl} {name}")
  for k in NAMES:
    assert_rel_close(grads[k], ref_grads[k], F32, f"{impl} d{k}")


def test_reset_shape_error():
  inp, _ = _inputs(4, 5)
  with pytest.raises(ValueError, match="reset must be"):
    selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"],
                   reset=jnp.zeros((B, 4), bool))
