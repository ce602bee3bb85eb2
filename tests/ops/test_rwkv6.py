"""seqmix.ops.linear_attention.rwkv6: chunked vs the reference scan (outputs, final state, all
gradients, u and the initial state included), the reference vs a plain numpy loop of the
contract, split sequences, jit, errors."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops.linear_attention import rwkv6
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

B, H, V = 2, 2, 16

# Compile-time budget of the CPU suite: the LLVM backend's optimisation passes dominate the
# compile of these small programs and buy nothing at these sizes (HLO-level passes still run).
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _decays(key, strength, shape, dtype):
  """weak: log-sigmoid(N(0, 1) + 3) (~ -0.05 a step); strong: log-sigmoid(N(0, 1)) / 0.05 (-14 a
  step on average, down to ~ -100) with -inf resets at ~5% of the entries."""
  x = jax.random.normal(key, shape)
  if strength == "weak":
    return jax.nn.log_sigmoid(x + 3.0).astype(dtype)
  reset = jax.random.uniform(jax.random.fold_in(key, 1), shape) < 0.05
  return jnp.where(reset, -jnp.inf, jax.nn.log_sigmoid(x) / 0.05).astype(dtype)


def _inputs(seed, strength, t, k_dim, dtype, with_h0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  r = jax.random.normal(ks[0], (B, t, H, k_dim)).astype(dtype)
  k = jax.random.normal(ks[1], (B, t, H, k_dim)).astype(dtype)
  v = jax.random.normal(ks[2], (B, t, H, V)).astype(dtype)
  w = _decays(ks[3], strength, (B, t, H, k_dim), dtype)
  u = jax.random.normal(ks[4], (H, k_dim)).astype(dtype)
  h0 = jax.random.normal(ks[5], (B, H, k_dim, V)) if with_h0 else None
  ct_o = jax.random.normal(ks[6], (B, t, H, V)).astype(dtype)
  ct_s = jax.random.normal(ks[7], (B, H, k_dim, V))
  return (r, k, v, w, u, h0), (ct_o, ct_s)


def _value_and_vjp(args, cts, impl, chunk_size):
  def f(r, k, v, w, u, h0):
    return rwkv6(r, k, v, w, u, initial_state=h0, chunk_size=chunk_size, impl=impl)
  out, vjp = jax.vjp(f, *args)
  return out, vjp(cts)


def _run(args, cts, impl, chunk_size):
  """Jitted (output, final state) and the gradients of <out, ct> w.r.t. every input and h0."""
  fn = jax.jit(functools.partial(_value_and_vjp, impl=impl, chunk_size=chunk_size))
  return fn.lower(args, cts).compile(compiler_options=_FAST_COMPILE)(args, cts)


def _check(strength, t, k_dim, chunk_size, dtype, with_h0, seed=0):
  args, cts = _inputs(seed, strength, t, k_dim, dtype, with_h0)
  # The oracle runs on the same values in float32; `chunked` runs in the inputs' dtype.
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  ref_out, ref_grads = _run(tuple(map(f32, args)), tuple(map(f32, cts)), "reference", chunk_size)
  out, grads = _run(args, cts, "chunked", chunk_size)
  rtol = RTOL[jnp.dtype(dtype).name]
  assert out[0].dtype == args[2].dtype and out[1].dtype == jnp.float32
  assert_trees_rel_close(out, ref_out, rtol, "outputs")
  assert_trees_rel_close(grads, ref_grads, rtol, "grads")


# The default run samples the grid so that every value of every axis appears at least once:
# (strength, T, K, chunk, dtype, initial state).
_SAMPLE = [
    ("strong", 100, 60, 64, jnp.float32, True),
    ("weak", 63, 16, 16, jnp.bfloat16, False),
    ("weak", 256, 64, 64, jnp.float32, False),
    ("strong", 1, 16, 16, jnp.float32, True),
    ("strong", 100, 64, 48, jnp.bfloat16, True),     # chunk 48: sub-chunks of 8
]


@pytest.mark.parametrize("strength,t,k_dim,chunk_size,dtype,with_h0", _SAMPLE)
def test_chunked_matches_reference(strength, t, k_dim, chunk_size, dtype, with_h0):
  _check(strength, t, k_dim, chunk_size, dtype, with_h0)


@pytest.mark.slow
@pytest.mark.parametrize("strength,t,k_dim,chunk_size,dtype,with_h0", list(itertools.product(
    ("weak", "strong"), (1, 63, 100, 256), (16, 60, 64), (16, 64),
    (jnp.float32, jnp.bfloat16), (False, True))))
def test_chunked_matches_reference_full_grid(strength, t, k_dim, chunk_size, dtype, with_h0):
  _check(strength, t, k_dim, chunk_size, dtype, with_h0)


def test_reference_matches_numpy_loop():
  """Conventions: read S_{t-1} plus the u-weighted current token, then decay and write; the
  default scale is 1.0."""
  (r, k, v, w, u, h0), _ = _inputs(1, "weak", 5, 8, jnp.float32, True)
  rn, kn, vn, wn, un = (np.asarray(x, np.float64) for x in (r, k, v, w, u))
  s = np.asarray(h0, np.float64).copy()
  want = np.zeros(v.shape)
  for i in range(r.shape[1]):
    kv = kn[:, i, :, :, None] * vn[:, i, :, None, :]                # [b, h, k, v]
    want[:, i] = np.einsum("bhk,bhkv->bhv", rn[:, i], s + un[None, :, :, None] * kv)
    s = np.exp(wn[:, i])[..., None] * s + kv
  for impl in ("reference", "chunked"):
    o, st = jax.jit(functools.partial(rwkv6, impl=impl, chunk_size=16))(
        r, k, v, w, u, initial_state=h0)
    assert_rel_close(o, want, 1e-5, f"{impl} output")
    assert_rel_close(st, s, 1e-5, f"{impl} state")


def test_split_sequence_equals_whole():
  """First 37 tokens -> state -> the other 63 from it equals the 100 tokens at once."""
  (r, k, v, w, u, h0), _ = _inputs(2, "strong", 100, 60, jnp.float32, True)
  run = jax.jit(functools.partial(rwkv6, chunk_size=16, impl="chunked"))
  o, s = run(r, k, v, w, u, initial_state=h0)
  a, b = slice(0, 37), slice(37, None)
  o1, s1 = run(r[:, a], k[:, a], v[:, a], w[:, a], u, initial_state=h0)
  o2, s2 = run(r[:, b], k[:, b], v[:, b], w[:, b], u, initial_state=s1)
  assert_rel_close(jnp.concatenate([o1, o2], axis=1), o, 1e-5, "output")
  assert_rel_close(s2, s, 1e-5, "final state")


@pytest.mark.parametrize("use_jit", [False, True])
def test_jit_and_eager_match_reference(use_jit):
  (r, k, v, w, u, h0), _ = _inputs(3, "weak", 20, 16, jnp.float32, True)
  op = functools.partial(rwkv6, chunk_size=16)   # impl="auto" -> chunked
  op = jax.jit(op) if use_jit else op
  got = op(r, k, v, w, u, initial_state=h0)
  want = rwkv6(r, k, v, w, u, initial_state=h0, impl="reference")
  assert_trees_rel_close(got, want, 1e-5, "rwkv6")


@pytest.mark.parametrize("bad,match", [
    ({"w": jnp.zeros((B, 4, H))}, "w must be"),
    ({"u": jnp.zeros((H, 15))}, "u must be"),
    ({"r": jnp.zeros((B, 4, 1, 16)), "k": jnp.zeros((B, 4, 1, 16))}, "same number of heads"),
    ({"initial_state": jnp.zeros((B, H, 16, V + 1))}, "initial_state must be"),
])
def test_bad_arguments_say_what_is_expected(bad, match):
  (r, k, v, w, u, _), _ = _inputs(0, "weak", 4, 16, jnp.float32, False)
  kw = {"r": r, "k": k, "v": v, "w": w, "u": u, **bad}
  with pytest.raises(ValueError, match=match):
    rwkv6(kw.pop("r"), kw.pop("k"), kw.pop("v"), kw.pop("w"), kw.pop("u"), **kw)
