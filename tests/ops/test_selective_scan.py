"""selective_scan: `chunked` against the `reference` oracle, the oracle against float64 numpy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops.ssm import selective_scan
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

BATCH, DIM, NSTATE = 2, 5, 4  # DIM: default channels; the grid also runs 16, 60 and 64


def _inputs(seed, t, dtype, strong=False, with_init=True, dim=DIM):
  """Mamba-like inputs. strong: step sizes up to ~e^3 so exp(Δ A) underflows to 0 (resets)."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(BATCH, t, dim))
  # Without softplus the caller supplies positive steps; negative ones would make exp(Δ A) > 1.
  delta = np.abs(rng.normal(size=(BATCH, t, dim))) + (4.0 if strong else 0.0)
  A = -np.exp(rng.normal(size=(dim, NSTATE)) + (2.0 if strong else 0.0))
  B = rng.normal(size=(BATCH, t, NSTATE))
  C = rng.normal(size=(BATCH, t, NSTATE))
  D = rng.normal(size=(dim,))
  bias = rng.normal(size=(dim,)) * 0.5
  h0 = rng.normal(size=(BATCH, dim, NSTATE)) if with_init else np.zeros((BATCH, dim, NSTATE))
  cast = lambda v, dt=dtype: jnp.asarray(v, dt)
  return dict(u=cast(u), delta=cast(delta), A=cast(A, jnp.float32), B=cast(B), C=cast(C),
              D=cast(D, jnp.float32), delta_bias=cast(bias, jnp.float32),
              initial_state=cast(h0, jnp.float32))


def _value_and_grads(impl, inp, softplus, chunk_size, seed):
  names = tuple(inp)

  def f(*vals):
    kw = dict(zip(names, vals))
    y, h = selective_scan(kw.pop("u"), kw.pop("delta"), kw.pop("A"), kw.pop("B"), kw.pop("C"),
                          kw.pop("D"), delta_softplus=softplus, chunk_size=chunk_size,
                          impl=impl, **kw)
    return y.astype(jnp.float32), h

  out, vjp = jax.vjp(f, *inp.values())
  rng = np.random.default_rng(seed + 1)
  cot = tuple(jnp.asarray(rng.normal(size=o.shape), o.dtype) for o in out)
  grads = vjp(cot)
  return out, dict(zip(names, (g.astype(jnp.float32) for g in grads)))


def _check(t, dtype, softplus, strong, with_init, chunk_size, dim, seed=0):
  inp = _inputs(seed, t, dtype, strong, with_init, dim)
  out, grads = _value_and_grads("chunked", inp, softplus, chunk_size, seed)
  ref_out, ref_grads = _value_and_grads("reference", inp, softplus, chunk_size, seed)
  rtol = RTOL[jnp.dtype(dtype).name]
  # Both sides compute in float32 from the same (possibly bf16-rounded) inputs and differ only
  # in summation order: float32 tolerance for float32 results, bf16 for results cast to bf16.
  assert_rel_close(out[0], ref_out[0], rtol, "y")
  assert_rel_close(out[1], ref_out[1], RTOL["float32"], "h_T")
  for name in grads:
    tol = rtol if inp[name].dtype == jnp.bfloat16 else RTOL["float32"]
    assert_rel_close(grads[name], ref_grads[name], tol, f"d{name}")


def test_reference_matches_float64_loop():
  inp = {k: np.asarray(v, np.float64) for k, v in _inputs(1, 23, jnp.float32).items()}
  y, h_t = selective_scan(*(jnp.asarray(inp[k], jnp.float32) for k in "u delta A B C D".split()),
                          delta_bias=jnp.asarray(inp["delta_bias"], jnp.float32),
                          delta_softplus=True,
                          initial_state=jnp.asarray(inp["initial_state"], jnp.float32),
                          impl="reference")
  dt = np.log1p(np.exp(inp["delta"] + inp["delta_bias"]))
  h = inp["initial_state"]
  want = []
  for t in range(dt.shape[1]):
    h = (np.exp(dt[:, t, :, None] * inp["A"]) * h
         + (dt[:, t] * inp["u"][:, t])[:, :, None] * inp["B"][:, t, None, :])
    want.append(np.einsum("bdn,bn->bd", h, inp["C"][:, t]) + inp["D"] * inp["u"][:, t])
  assert_rel_close(y, np.stack(want, 1), RTOL["float32"], "y")
  assert_rel_close(h_t, h, RTOL["float32"], "h_T")


SAMPLED = [
    # T, dtype, softplus, strong, with_init, chunk_size, dim
    (1, jnp.float32, True, False, True, 64, 16),
    (63, jnp.float32, False, True, True, 16, 60),
    (100, jnp.bfloat16, True, False, False, 16, 64),
    (1024, jnp.float32, True, False, True, 64, DIM),
]


@pytest.mark.parametrize("t,dtype,softplus,strong,with_init,chunk_size,dim", SAMPLED)
def test_chunked_matches_reference(t, dtype, softplus, strong, with_init, chunk_size, dim):
  _check(t, dtype, softplus, strong, with_init, chunk_size, dim)


@pytest.mark.slow
@pytest.mark.parametrize("t,dtype,softplus,strong,with_init,chunk_size,dim", list(
    itertools.product((1, 63, 100, 1024), (jnp.float32, jnp.bfloat16), (False, True),
                      (False, True), (False, True), (16, 64), (16, 60, 64))))
def test_chunked_matches_reference_full(t, dtype, softplus, strong, with_init, chunk_size, dim):
  _check(t, dtype, softplus, strong, with_init, chunk_size, dim)


@pytest.mark.parametrize("impl", ("reference", "chunked"))
def test_split_equals_whole(impl):
  inp = _inputs(4, 50, jnp.float32)
  run = lambda sl, h0: selective_scan(
      inp["u"][:, sl], inp["delta"][:, sl], inp["A"], inp["B"][:, sl], inp["C"][:, sl],
      inp["D"], delta_bias=inp["delta_bias"], delta_softplus=True, initial_state=h0,
      chunk_size=16, impl=impl)
  y, h = run(slice(None), inp["initial_state"])
  y1, h1 = run(slice(0, 21), inp["initial_state"])
  y2, h2 = run(slice(21, None), h1)
  assert_trees_rel_close((jnp.concatenate([y1, y2], 1), h2), (y, h), RTOL["float32"])


def test_jit_defaults_and_errors():
  inp = _inputs(5, 17, jnp.bfloat16)
  u, delta, A, B, C = (inp[k] for k in "u delta A B C".split())
  y, h = jax.jit(lambda *a: selective_scan(*a, chunk_size=8))(u, delta, A, B, C)
  assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32 and h.shape == (BATCH, DIM, NSTATE)
  y_ref, h_ref = selective_scan(u, delta, A, B, C, impl="reference")
  assert_rel_close(h, h_ref, RTOL["float32"], "h_T")
  with pytest.raises(NotImplementedError, match="chunked"):
    selective_scan(u, delta, A, B, C, impl="pallas")
  with pytest.raises(ValueError, match="A must be"):
    selective_scan(u, delta, A.T, B, C)
