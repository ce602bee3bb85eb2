"""seqmix.ops.ttt: the dual (chunked) form vs the jax.grad primal oracle, decoding, splits."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops import ttt
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

_OPS = {"linear": ttt.ttt_linear, "mlp": ttt.ttt_mlp}
# Compile time dominates these small programs; the LLVM passes buy nothing at these sizes.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


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


def _run_with_grads(kind, impl, args, state, cot_seed=7, mb=16):
  """Output, final state and the VJP of a random cotangent w.r.t. every float input (one jit)."""
  op = _OPS[kind]

  def fn(args, state):
    q, k, v, eta, ln_w, ln_b, tau = args
    out, final = op(q, k, v, eta, ln_w, ln_b, token_scale=tau, initial_state=state,
                    mini_batch=mb, impl=impl)
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

  inputs = (args, None, None, cot) if state is None else (args, tuple(state[:-1]), state.count,
                                                          cot)
  return run.lower(*inputs).compile(compiler_options=_FAST_COMPILE)(*inputs)


def _check_chunked_vs_reference(kind, t, dtype, init, dk=8, mb=16, seed=0):
  args, state = _inputs(seed, kind, t, dtype, init, dk=dk, mb=mb)
  o_c, s_c, n_c, g_c = _run_with_grads(kind, "chunked", args, state, mb=mb)
  o_r, s_r, n_r, g_r = _run_with_grads(kind, "reference", args, state, mb=mb)
  rtol = RTOL[jnp.dtype(dtype).name]
  assert o_c.dtype == jnp.dtype(dtype) and o_c.shape == args[0].shape
  assert all(x.dtype == jnp.float32 for x in s_c)
  np.testing.assert_array_equal(n_c, n_r)
  np.testing.assert_array_equal(n_c, ((0 if state is None else state.count) + t) % mb)
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
    # kind, t, dtype, init, dk, mini_batch   (T = 1 is covered by test_decode_matches_parallel)
    ("linear", 256, jnp.float32, "pending", 16, 8),
    ("linear", 16, jnp.bfloat16, "fresh", 8, 16),
    ("mlp", 63, jnp.float32, "pending", 8, 16),
]


@pytest.mark.parametrize("kind,t,dtype,init,dk,mb", _SAMPLE)
def test_chunked_matches_reference(kind, t, dtype, init, dk, mb):
  _check_chunked_vs_reference(kind, t, dtype, init, dk, mb)


@pytest.mark.slow
@pytest.mark.parametrize("kind,t,dtype,init,dk,mb", [
    (kind, t, dtype, init, dk, mb) for kind, t, dtype, init, (dk, mb) in itertools.product(
        ["linear", "mlp"], [1, 16, 63, 100, 256], [jnp.float32, jnp.bfloat16],
        [None, "fresh", "pending"], [(8, 16), (16, 8)])])
def test_chunked_matches_reference_full(kind, t, dtype, init, dk, mb):
  _check_chunked_vs_reference(kind, t, dtype, init, dk, mb)


@pytest.mark.parametrize("kind", ["linear", pytest.param("mlp", marks=pytest.mark.slow)])
def test_default_state_forward(kind):
  """initial_state=None (zero weights): forward and final state agree."""
  args, _ = _inputs(1, kind, 37, jnp.float32, None)
  run = lambda impl: jax.jit(lambda a: _OPS[kind](*a[:6], token_scale=a[6], impl=impl))(args)
  o_c, s_c = run("chunked")
  o_r, s_r = run("reference")
  assert_rel_close(o_c, o_r, 1e-5, "out")
  assert_trees_rel_close(s_c, s_r, 1e-5, "state")


def _np_layer_norm(z, gamma, beta):
  """LN over the last axis, population variance, eps 1e-6: (y, x_hat, std)."""
  mu = z.mean(-1, keepdims=True)
  std = np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
  return gamma * (z - mu) / std + beta, (z - mu) / std, std


def _np_gelu(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_gelu_grad(x):
  c = np.sqrt(2.0 / np.pi)
  th = np.tanh(c * (x + 0.044715 * x ** 3))
  return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th ** 2) * c * (1.0 + 3 * 0.044715 * x ** 2)


def _np_inner(kind, theta, x):
  """f_res(x; θ) and what its backward needs; θ = (W, b) or (W1, b1, W2, b2), b's [1, O]."""
  if kind == "linear":
    w, b = theta
    return x @ w + b[0], None
  w1, b1, w2, b2 = theta
  z1 = x @ w1 + b1[0]
  return _np_gelu(z1) @ w2 + b2[0], z1


def _np_inner_grad(kind, theta, k, v, gamma, beta):
  """∇θ ½‖LN(f_res(k; θ)) − (v − k)‖² written out (the LayerNorm and MLP backward by hand)."""
  z, z1 = _np_inner(kind, theta, k)
  y, x_hat, std = _np_layer_norm(z, gamma, beta)
  g_hat = (y - (v - k)) * gamma
  dz = (g_hat - g_hat.mean() - x_hat * (g_hat * x_hat).mean()) / std          # [k]
  if kind == "linear":
    return np.outer(k, dz), dz[None]
  w1, _, w2, _ = theta
  dz1 = (w2 @ dz) * _np_gelu_grad(z1)                                           # [4k]
  return np.outer(k, dz1), dz1[None], np.outer(_np_gelu(z1), dz), dz[None]


def _np_ttt(kind, q, k, v, eta, gamma, beta, tau, state, mb):
  """The TTT layer from the paper in float64 numpy, token by token (no seqmix code).

  Per (batch, head): gradients of a mini-batch are taken at its boundary weights θ₀; token t at
  position j reads with θ₀ − τ_j Σ_{s<=t in the mini-batch} eta_s ∇l_s(θ₀), and θ₀ moves to the
  weights of the mini-batch's last token.
  """
  f64 = lambda x: np.asarray(x, np.float64)
  q, k, v, eta, gamma, beta, tau = map(f64, (q, k, v, eta, gamma, beta, tau))
  n = (len(state) - 1) // 2
  bsz, t, h, _ = q.shape
  out = np.zeros(q.shape)
  params = [f64(x).copy() for x in state[:n]]
  pend = [f64(x).copy() for x in state[n:2 * n]]
  count = np.asarray(state.count).copy()
  for bi in range(bsz):
    for hi in range(h):
      theta = [x[bi, hi] for x in params]
      acc = [x[bi, hi] for x in pend]
      c = int(count[bi])
      for ti in range(t):
        grad = _np_inner_grad(kind, theta, k[bi, ti, hi], v[bi, ti, hi], gamma[hi], beta[hi])
        acc = [a + eta[bi, ti, hi] * g for a, g in zip(acc, grad)]
        now = [p - tau[c] * a for p, a in zip(theta, acc)]
        out[bi, ti, hi] = q[bi, ti, hi] + _np_layer_norm(
            _np_inner(kind, now, q[bi, ti, hi])[0], gamma[hi], beta[hi])[0]
        c += 1
        if c == mb:
          theta, acc, c = now, [np.zeros_like(a) for a in acc], 0
      for x, y in zip(params, theta):
        x[bi, hi] = y
      for x, y in zip(pend, acc):
        x[bi, hi] = y
    count[bi] = (count[bi] + t) % mb
  return out, params, pend, count


def _np_numeric_grad(kind, theta, k, v, gamma, beta, eps=1e-6):
  """Central differences of the inner loss in float64 (anchors the hand-written backward)."""
  def loss(th):
    y = _np_layer_norm(_np_inner(kind, th, k)[0], gamma, beta)[0]
    return 0.5 * np.sum((y - (v - k)) ** 2)
  grads = []
  for i, p in enumerate(theta):
    g = np.zeros_like(p)
    for idx in np.ndindex(p.shape):
      hi, lo = [x.copy() for x in theta], [x.copy() for x in theta]
      hi[i][idx] += eps
      lo[i][idx] -= eps
      g[idx] = (loss(hi) - loss(lo)) / (2 * eps)
    grads.append(g)
  return grads


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_matches_float64_numpy(kind):
  """Both impls against the layer written out in float64 numpy (its own LayerNorm, gelu and
  inner gradients, checked by central differences): 3 mini-batches of 4 plus a partial one,
  entering mid-mini-batch with a different count per batch row, outputs and final state."""
  t, mb, dk, b, h = 11, 4, 4, 2, 2
  # numpy inputs (float32 values): eager jax.random at new shapes costs a compile per call.
  rng = np.random.default_rng(2)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  q, k, v = f32(b, t, h, dk), f32(b, t, h, dk), f32(b, t, h, dk)
  # Rates 10x the usual sigmoid/K, so the inner steps move the weights visibly.
  eta = (10.0 / (1.0 + np.exp(-f32(b, t, h))) / dk).astype(np.float32)
  ln_w, ln_b = (1.0 + 0.1 * f32(h, dk)).astype(np.float32), (0.1 * f32(h, dk)).astype(np.float32)
  tau = (1.0 / np.arange(1, mb + 1) + 0.05 * f32(mb)).astype(np.float32)
  shapes = ([(dk, dk), (1, dk)] if kind == "linear" else
            [(dk, 4 * dk), (1, 4 * dk), (4 * dk, dk), (1, dk)])
  weights = [f32(b, h, *sh) * np.float32(sh[0] ** -0.5) for sh in shapes]
  pending = [0.1 * f32(b, h, *sh) for sh in shapes]
  cls = ttt.TTTLinearState if kind == "linear" else ttt.TTTMLPState
  state = cls(*map(jnp.asarray, weights + pending), jnp.asarray([1, 3], jnp.int32))
  one = [np.asarray(x, np.float64) for x in (k[0, 0, 0], v[0, 0, 0], ln_w[0], ln_b[0])]
  theta = [np.asarray(w[0, 0], np.float64) for w in weights]
  for got, want in zip(_np_inner_grad(kind, theta, *one), _np_numeric_grad(kind, theta, *one)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
  want_out, want_params, want_pend, want_count = _np_ttt(kind, q, k, v, eta, ln_w, ln_b, tau,
                                                          state, mb)
  for impl in ("reference", "chunked"):
    run = jax.jit(lambda *a, impl=impl: _OPS[kind](*a[:6], token_scale=a[6],
                                                   initial_state=state, mini_batch=mb, impl=impl))
    args = tuple(map(jnp.asarray, (q, k, v, eta, ln_w, ln_b, tau)))
    out, final = run.lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)
    assert_rel_close(out, want_out, RTOL["float32"], f"{impl} out")
    for name, x, want in zip(final._fields, final[:-1], want_params + want_pend):
      assert_rel_close(x, want, RTOL["float32"], f"{impl} {name}")
    np.testing.assert_array_equal(final.count, want_count)


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


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_pallas_not_built(kind):
  args, _ = _inputs(0, kind, 4, jnp.float32, None)
  with pytest.raises(NotImplementedError, match="reference.*chunked"):
    _OPS[kind](*args[:6], impl="pallas")


def test_bad_state_is_explained():
  args, state = _inputs(0, "linear", 4, jnp.float32, "fresh")
  with pytest.raises(ValueError, match="TTTMLPState"):
    ttt.ttt_mlp(*args[:6], initial_state=state)
