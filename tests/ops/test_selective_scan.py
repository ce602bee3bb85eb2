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


def _oracle_inputs(seed, t, dim, nstate, strong, with_d, with_bias, with_init):
  """float32 inputs (so that float64 copies hold the very same values) as a dict."""
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  inp = dict(u=f32(BATCH, t, dim), delta=np.abs(f32(BATCH, t, dim)) + (4.0 if strong else 0.0),
             A=-np.exp(f32(dim, nstate) + (2.0 if strong else 0.0)), B=f32(BATCH, t, nstate),
             C=f32(BATCH, t, nstate))
  inp["D"] = f32(dim) if with_d else None
  inp["delta_bias"] = 0.5 * f32(dim) if with_bias else None
  inp["initial_state"] = f32(BATCH, dim, nstate) if with_init else None
  return {k: None if v is None else np.asarray(v, np.float32) for k, v in inp.items()}


def _numpy_selective_scan(inp, softplus):
  """DESIGN.md's recurrence in float64 numpy, token by token (no seqmix code)."""
  x = {k: None if v is None else np.asarray(v, np.float64) for k, v in inp.items()}
  b, t, d = x["u"].shape
  dt = x["delta"] + (0.0 if x["delta_bias"] is None else x["delta_bias"])
  if softplus:
    dt = np.logaddexp(0.0, dt)
  h = np.zeros((b, d, x["A"].shape[1])) if x["initial_state"] is None else x["initial_state"]
  ys = []
  for i in range(t):
    h = (np.exp(dt[:, i, :, None] * x["A"]) * h
         + (dt[:, i] * x["u"][:, i])[:, :, None] * x["B"][:, i, None, :])
    y = np.einsum("bdn,bn->bd", h, x["C"][:, i])
    ys.append(y if x["D"] is None else y + x["D"] * x["u"][:, i])
  return np.stack(ys, 1), h


def _jax64_selective_scan(inp, softplus):
  """The same recurrence in float64 JAX (call under `jax.enable_x64`), for its gradients."""
  dt = inp["delta"] + (0.0 if inp["delta_bias"] is None else inp["delta_bias"])
  if softplus:
    dt = jnp.logaddexp(0.0, dt)
  b, _, d = inp["u"].shape
  h0 = inp["initial_state"]
  h0 = jnp.zeros((b, d, inp["A"].shape[1]), jnp.float64) if h0 is None else h0

  def step(h, xs):
    dt_i, u_i, b_i, c_i = xs
    h = jnp.exp(dt_i[:, :, None] * inp["A"]) * h + (dt_i * u_i)[:, :, None] * b_i[:, None, :]
    return h, jnp.einsum("bdn,bn->bd", h, c_i)

  xs = tuple(jnp.swapaxes(v, 0, 1) for v in (dt, inp["u"], inp["B"], inp["C"]))
  h, y = jax.lax.scan(step, h0, xs)
  y = jnp.swapaxes(y, 0, 1)
  return (y if inp["D"] is None else y + inp["D"] * inp["u"]), h


# Compile time dominates these small programs; the LLVM passes buy nothing at these sizes.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit_run(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


_ORACLE_CASES = [
    # impl, t, dim, nstate, softplus, strong, D, delta_bias, initial_state, chunk
    ("chunked", 1, 3, 1, False, False, False, False, False, 8),
    ("reference", 23, 5, 4, True, False, True, True, True, 8),
    ("chunked", 64, 16, 16, True, True, True, True, True, 16),
    ("reference", 100, 7, 3, False, False, True, False, False, 16),
]


def _other_impl(case):
  return ({"reference": "chunked", "chunked": "reference"}[case[0]],) + case[1:]


_ORACLE_ARGS = "impl,t,dim,nstate,softplus,strong,with_d,with_bias,with_init,chunk"


@pytest.mark.parametrize(_ORACLE_ARGS, _ORACLE_CASES)
def test_matches_float64_oracle(impl, t, dim, nstate, softplus, strong, with_d, with_bias,
                                with_init, chunk):
  """An impl against the recurrence written out in float64: y, h_T and the gradients of every
  input. The discretisation, D, delta_bias and softplus are code the impls share, so comparing
  the impls with each other cannot see a mistake there; this oracle calls no seqmix code. The
  default run alternates the impls over the cases (each sees softplus, a bias, D and h0)."""
  _check_oracle(impl, t, dim, nstate, softplus, strong, with_d, with_bias, with_init, chunk)


@pytest.mark.slow
@pytest.mark.parametrize(_ORACLE_ARGS, [_other_impl(c) for c in _ORACLE_CASES])
def test_matches_float64_oracle_other_impl(impl, t, dim, nstate, softplus, strong, with_d,
                                           with_bias, with_init, chunk):
  _check_oracle(impl, t, dim, nstate, softplus, strong, with_d, with_bias, with_init, chunk)


def _check_oracle(impl, t, dim, nstate, softplus, strong, with_d, with_bias, with_init, chunk):
  inp = _oracle_inputs(11, t, dim, nstate, strong, with_d, with_bias, with_init)
  names = [k for k, v in inp.items() if v is not None]
  rng = np.random.default_rng(12)
  ct = (rng.normal(size=(BATCH, t, dim)).astype(np.float32),
        rng.normal(size=(BATCH, dim, nstate)).astype(np.float32))
  want_y, want_h = _numpy_selective_scan(inp, softplus)
  with jax.enable_x64(True):
    def vjp64(vals, cts):
      out, vjp = jax.vjp(lambda *v: _jax64_selective_scan({**inp, **dict(zip(names, v))},
                                                          softplus), *vals)
      return out, vjp(cts)
    out64, want_grads = jax.tree.map(np.asarray, _jit_run(
        vjp64, [jnp.asarray(inp[k], jnp.float64) for k in names],
        tuple(jnp.asarray(c, jnp.float64) for c in ct)))
  # The float64 JAX copy is the numpy recurrence (its gradients are then those of the formula).
  np.testing.assert_allclose(out64[0], want_y, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(out64[1], want_h, rtol=1e-12, atol=1e-12)

  def vjp32(vals, cts):
    def f(*vals):
      kw = {**{k: None for k in inp}, **dict(zip(names, vals))}
      return selective_scan(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], kw["D"],
                            delta_bias=kw["delta_bias"], delta_softplus=softplus,
                            initial_state=kw["initial_state"], chunk_size=chunk, impl=impl)
    out, vjp = jax.vjp(f, *vals)
    return out, vjp(cts)

  (y, h), grads = _jit_run(vjp32, [jnp.asarray(inp[k]) for k in names],
                           tuple(jnp.asarray(c) for c in ct))
  assert_rel_close(y, want_y, RTOL["float32"], f"{impl} y")
  assert_rel_close(h, want_h, RTOL["float32"], f"{impl} h_T")
  for name, g, want in zip(names, grads, want_grads):
    assert_rel_close(g, want, RTOL["float32"], f"{impl} d{name}")


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
  # Both impls compute in float32 from the same bf16 inputs; y is rounded to bf16 at the end.
  assert_rel_close(y, y_ref, RTOL["bfloat16"], "y")
  assert_rel_close(h, h_ref, RTOL["float32"], "h_T")
  with pytest.raises(ValueError, match="unknown impl"):
    selective_scan(u, delta, A, B, C, impl="associative")
  with pytest.raises(ValueError, match="A must be"):
    selective_scan(u, delta, A.T, B, C)
