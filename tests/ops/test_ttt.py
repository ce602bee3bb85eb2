"""seqmix.ops.ttt: the dual (chunked) form vs the jax.grad primal oracle, decoding, splits."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops import ttt
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

_OPS = {"linear": ttt.ttt_linear, "mlp": ttt.ttt_mlp}


def _inputs(seed, kind, t, dtype, init, b=2, h=2, dk=8, mb=16):
  """(q, k, v, eta, ln_weight, ln_bias, token_scale), initial_state for one configuration.

  init: None (the op's zero default), "fresh" (random weights, count 0) or "pending" (random
  weights, random pending gradient sums and count = 5: a state entering mid-mini-batch).
  """
  ks = jax.random.split(jax.random.PRNGKey(seed), 16)
  q, k, v = (jax.random.normal(ks[j], (b, t, h, dk)).astype(dtype) for j in range(3))
  eta = (jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h))) / dk).astype(dtype)
  ln_w = (1.0 + 0.1 * jax.random.normal(ks[4], (h, dk))).astype(dtype)
  ln_b = (0.1 * jax.random.normal(ks[5], (h, dk))).astype(dtype)
  # The official layer's 1/(j+1) plus a small learnable offset.
  tau = 1.0 / jnp.arange(1, mb + 1) + 0.01 * jax.random.normal(ks[6], (mb,))
  args = (q, k, v, eta, ln_w, ln_b, tau)
  if init is None:
    return args, None
  dm = 4 * dk
  shapes = ([(dk, dk), (1, dk)] if kind == "linear" else
            [(dk, dm), (1, dm), (dm, dk), (1, dk)])
  weights = [jax.random.normal(ks[7 + j], (h,) + s) * s[0] ** -0.5
             for j, s in enumerate(shapes)]
  state = (ttt.linear_state if kind == "linear" else ttt.mlp_state)(*weights, b)
  if init == "pending":
    n = len(shapes)
    grads = [0.1 * jax.random.normal(ks[12 + j], x.shape) for j, x in enumerate(state[n:2 * n])]
    state = state._replace(**dict(zip(state._fields[n:2 * n], grads)),
                           count=jnp.full((b,), 5, jnp.int32))
  return args, state


def _run_with_grads(kind, impl, args, state, cot_seed=7):
  """Output, final state and the VJP of a random cotangent w.r.t. every float input (one jit)."""
  op = _OPS[kind]

  def fn(args, state):
    q, k, v, eta, ln_w, ln_b, tau = args
    out, final = op(q, k, v, eta, ln_w, ln_b, token_scale=tau, initial_state=state, impl=impl)
    return out, final[:-1], final.count

  shapes = jax.eval_shape(fn, args, state)[:2]
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(cot_seed), len(leaves))
  cot = jax.tree_util.tree_unflatten(tree, [
      jax.random.normal(kk, x.shape, jnp.float32).astype(x.dtype) for kk, x in zip(keys, leaves)])

  @jax.jit
  def run(args, floats, count, cot):
    # The integer count is held fixed; every float leaf (inputs and state) is differentiated.
    def f(a, fl):
      out, final, fcount = fn(a, None if fl is None else type(state)(*fl, count))
      return (out, final), fcount

    (out, final), vjp, fcount = jax.vjp(f, args, floats, has_aux=True)
    return out, final, fcount, vjp(cot)

  if state is None:
    return run(args, None, None, cot)
  return run(args, tuple(state[:-1]), state.count, cot)


def _check_chunked_vs_reference(kind, t, dtype, init, seed=0):
  args, state = _inputs(seed, kind, t, dtype, init)
  o_c, s_c, n_c, g_c = _run_with_grads(kind, "chunked", args, state)
  o_r, s_r, n_r, g_r = _run_with_grads(kind, "reference", args, state)
  rtol = RTOL[jnp.dtype(dtype).name]
  assert o_c.dtype == jnp.dtype(dtype) and o_c.shape == args[0].shape
  assert all(x.dtype == jnp.float32 for x in s_c)
  np.testing.assert_array_equal(n_c, n_r)
  np.testing.assert_array_equal(n_c, ((0 if state is None else state.count) + t) % 16)
  assert_rel_close(o_c, o_r, rtol, "out")
  assert_trees_rel_close(s_c, s_r, rtol, "state")
  if init is None:
    # From zero weights every update of the first mini-batch is -τ_j·(...) fed through a
    # LayerNorm, which is scale-invariant: the true gradient w.r.t. token_scale is ~0 (only
    # LN's eps sees the scale), so its relative error is rounding noise. Check it is finite
    # and compare everything else.
    assert np.all(np.isfinite(np.asarray(g_c[0][6]))) and np.all(np.isfinite(g_r[0][6]))
    g_c, g_r = (g[0][:6] for g in (g_c, g_r))
  assert_trees_rel_close(g_c, g_r, rtol, "grads")


# A sample covering every axis at least once; the full product runs under -m slow.
_SAMPLE = [
    # kind, t, dtype, init   (T = 1 is covered by test_decode_matches_parallel)
    ("linear", 100, jnp.float32, "pending"),
    ("linear", 16, jnp.bfloat16, "fresh"),
    ("mlp", 63, jnp.float32, "pending"),
]


@pytest.mark.parametrize("kind,t,dtype,init", _SAMPLE)
def test_chunked_matches_reference(kind, t, dtype, init):
  _check_chunked_vs_reference(kind, t, dtype, init)


@pytest.mark.slow
@pytest.mark.parametrize("kind,t,dtype,init", list(itertools.product(
    ["linear", "mlp"], [1, 16, 63, 100], [jnp.float32, jnp.bfloat16], [None, "fresh", "pending"])))
def test_chunked_matches_reference_full(kind, t, dtype, init):
  _check_chunked_vs_reference(kind, t, dtype, init)


@pytest.mark.parametrize("kind", ["linear", pytest.param("mlp", marks=pytest.mark.slow)])
def test_default_state_forward(kind):
  """initial_state=None (zero weights): forward and final state agree."""
  args, _ = _inputs(1, kind, 37, jnp.float32, None)
  run = lambda impl: jax.jit(lambda a: _OPS[kind](*a[:6], token_scale=a[6], impl=impl))(args)
  o_c, s_c = run("chunked")
  o_r, s_r = run("reference")
  assert_rel_close(o_c, o_r, 1e-5, "out")
  assert_trees_rel_close(s_c, s_r, 1e-5, "state")


def test_reference_inner_step_by_hand():
  """TTT-Linear, one mini-batch, B = H = 1: token t reads with
  W_t = W - τ_t Σ_{s<=t} eta_s k_sᵀ g_s, g_s the LayerNorm+L2 gradient at W (numpy, float64)."""
  (q, k, v, eta, ln_w, ln_b, tau), state = _inputs(2, "linear", 16, jnp.float32, "fresh", b=1,
                                                   h=1)
  out, final = ttt.ttt_linear(q, k, v, eta, ln_w, ln_b, token_scale=tau, initial_state=state,
                              impl="reference")
  f64 = lambda x: np.asarray(x, np.float64)
  qn, kn, vn, en = f64(q[0, :, 0]), f64(k[0, :, 0]), f64(v[0, :, 0]), f64(eta[0, :, 0])
  gamma, beta, taun = f64(ln_w[0]), f64(ln_b[0]), f64(tau)
  w, b = f64(state.w[0, 0]), f64(state.b[0, 0, 0])

  def ln(z):
    mu, std = z.mean(-1, keepdims=True), np.sqrt(z.var(-1, keepdims=True) + 1e-6)
    return gamma * (z - mu) / std + beta, (z - mu) / std, std

  z = kn @ w + b
  y, xh, std = ln(z)
  gh = (y - (vn - kn)) * gamma
  g = (gh - gh.mean(-1, keepdims=True) - xh * (gh * xh).mean(-1, keepdims=True)) / std
  want, gw, gb = [], 0.0, 0.0
  for t in range(16):
    gw, gb = gw + en[t] * np.outer(kn[t], g[t]), gb + en[t] * g[t]
    want.append(qn[t] + ln(qn[t] @ (w - taun[t] * gw) + (b - taun[t] * gb))[0])
  assert_rel_close(out[0, :, 0], np.stack(want), 1e-5, "out")
  assert_rel_close(final.w[0, 0], w - taun[15] * gw, 1e-5, "W after the mini-batch")
  assert int(final.count[0]) == 0


def _jitted(kind, ln_w, ln_b, tau):
  op = _OPS[kind]
  return jax.jit(lambda xs, s: op(*xs, ln_w, ln_b, token_scale=tau, initial_state=s,
                                  impl="chunked"))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_decode_matches_parallel(kind):
  """Token-by-token calls (T = 1 each, the state carrying the pending mini-batch) equal one call."""
  t = 37
  (q, k, v, eta, ln_w, ln_b, tau), state = _inputs(3, kind, t, jnp.float32, "fresh")
  run = _jitted(kind, ln_w, ln_b, tau)
  out, final = run((q, k, v, eta), state)
  outs, s = [], state
  for i in range(t):
    o, s = run([x[:, i:i + 1] for x in (q, k, v, eta)], s)
    outs.append(o)
  assert_rel_close(jnp.concatenate(outs, axis=1), out, 1e-5, "out")
  assert_trees_rel_close(s[:-1], final[:-1], 1e-5, "state")
  np.testing.assert_array_equal(s.count, final.count)


# One kind suffices by default: both share the state handling of `_chunked`.
@pytest.mark.parametrize("kind", ["mlp", pytest.param("linear", marks=pytest.mark.slow)])
def test_split_matches_whole(kind):
  """Prefill in pieces [0,5), [5,13), [13,37), [37,50) from the returned states equals one call."""
  (q, k, v, eta, ln_w, ln_b, tau), state = _inputs(4, kind, 50, jnp.float32, "fresh")
  run = _jitted(kind, ln_w, ln_b, tau)
  out, final = run((q, k, v, eta), state)
  outs, s = [], state
  for lo, hi in [(0, 5), (5, 13), (13, 37), (37, 50)]:
    o, s = run([x[:, lo:hi] for x in (q, k, v, eta)], s)
    outs.append(o)
  assert_rel_close(jnp.concatenate(outs, axis=1), out, 1e-5, "out")
  assert_trees_rel_close(s[:-1], final[:-1], 1e-5, "state")
  np.testing.assert_array_equal(s.count, final.count)


def test_jit_matches_eager():
  args, state = _inputs(5, "linear", 20, jnp.float32, "pending")
  fn = lambda a, s: ttt.ttt_linear(*a[:6], token_scale=a[6], initial_state=s, impl="chunked")
  assert_trees_rel_close(jax.jit(fn)(args, state), fn(args, state), 1e-6, "jit")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_pallas_not_built(kind):
  args, _ = _inputs(0, kind, 4, jnp.float32, None)
  with pytest.raises(NotImplementedError, match="reference.*chunked"):
    _OPS[kind](*args[:6], impl="pallas")


def test_bad_state_is_explained():
  args, state = _inputs(0, "linear", 4, jnp.float32, "fresh")
  with pytest.raises(ValueError, match="TTTMLPState"):
    ttt.ttt_mlp(*args[:6], initial_state=state)
