"""seqmix.ops.delta_rule: chunked vs the reference scan, and the reference vs the contract."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops.delta_rule import delta_rule
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

# One compile per call signature (eager op-by-op dispatch of the chunked form compiles dozens
# of small programs, which dominates CPU test time).
_op = jax.jit(delta_rule, static_argnames=("chunk_size", "impl"))


def _inputs(seed, *, t, dk, dv, gate, dtype=jnp.float32, b=1, g_heads=1, h=2, init=True):
  """Random op inputs (numpy: no per-op compiles); k is L2-normalised as a mixer would do."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  q = normal(b, t, g_heads, dk)
  k = normal(b, t, g_heads, dk)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = normal(b, t, h, dv)
  beta = 1.0 / (1.0 + np.exp(-normal(b, t, h)))
  z = normal(b, t, h)
  if gate is None:
    g = None
  elif gate == "weak":
    g = log_sigmoid(z + 4.0)                                   # about -0.02 per step
  elif gate == "strong":
    g = log_sigmoid(z) / 0.05                                  # -14 on average, often < -20
    g = np.where(rng.uniform(size=(b, t, h)) < 0.05, -np.inf, g)  # hard resets
  else:
    raise ValueError(gate)
  s0 = jnp.asarray(normal(b, h, dk, dv)) if init else None
  cast = lambda x: None if x is None else jnp.asarray(x, dtype)
  return dict(q=cast(q), k=cast(k), v=cast(v), beta=cast(beta), g=cast(g), initial_state=s0)


def _value_and_grads(args, impl, chunk_size, cot_dtype=jnp.float32, seed=123):
  """(o, final state) and the gradients of <o, co> + <s, cs> for random cotangents.

  `co` is rounded to `cot_dtype`: an op with bfloat16 outputs receives bfloat16 cotangents, so
  the float32 oracle gets the same rounded values (the rounding of a cotangent alone moves
  ill-conditioned gradients such as dq = co·vᵀ... by ~1e-2, which is no error of the op).
  """
  diff = {n: x for n, x in args.items() if x is not None}

  def loss(d):
    o, s = delta_rule(d["q"], d["k"], d["v"], d["beta"], d.get("g"),
                      initial_state=d.get("initial_state"), chunk_size=chunk_size, impl=impl)
    ko, ks = jax.random.split(jax.random.PRNGKey(seed))
    co = jax.random.normal(ko, o.shape).astype(cot_dtype).astype(jnp.float32)
    cs = jax.random.normal(ks, s.shape)
    return jnp.sum(o.astype(jnp.float32) * co) + jnp.sum(s * cs), (o, s)

  (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(diff)
  return o, s, grads


def _check_chunked(t, dk, dv, chunk, dtype, gate, init, g_heads=1, h=2):
  args = _inputs(0, t=t, dk=dk, dv=dv, gate=gate, dtype=dtype, g_heads=g_heads, h=h, init=init)
  # The oracle is the float32 reference on the same (possibly bfloat16-rounded) values.
  args32 = {n: None if x is None else x.astype(jnp.float32) for n, x in args.items()}
  o_ref, s_ref, g_ref = _value_and_grads(args32, "reference", chunk, cot_dtype=dtype)
  o, s, grads = _value_and_grads(args, "chunked", chunk, cot_dtype=dtype)
  assert o.dtype == dtype and o.shape == (1, t, h, dv)
  assert s.dtype == jnp.float32 and s.shape == (1, h, dk, dv)
  rtol = RTOL[jnp.dtype(dtype).name]
  assert_rel_close(o, o_ref, rtol, "output")
  assert_rel_close(s, s_ref, rtol, "final state")
  assert_trees_rel_close(grads, g_ref, rtol, "grad")


# Each axis of the grid (T, head dims, chunk, dtype, gate, initial state, grouped heads)
# appears at least once here; the full product is test_chunked_matches_reference_full.
SAMPLED = [
    # t,  dk, dv, chunk, dtype,        gate,     init,  g_heads
    (63, 16, 16, 16, jnp.float32, "strong", True, 1),
    (100, 60, 60, 64, jnp.float32, "weak", False, 2),
    (1, 64, 64, 64, jnp.float32, None, True, 2),
    (256, 16, 60, 64, jnp.float32, None, True, 1),
    (100, 64, 16, 16, jnp.bfloat16, "strong", True, 2),
    (63, 60, 64, 16, jnp.bfloat16, None, False, 1),
]


@pytest.mark.parametrize("t,dk,dv,chunk,dtype,gate,init,g_heads", SAMPLED)
def test_chunked_matches_reference(t, dk, dv, chunk, dtype, gate, init, g_heads):
  _check_chunked(t, dk, dv, chunk, dtype, gate, init, g_heads)


@pytest.mark.slow
@pytest.mark.parametrize("t,dims,chunk,dtype,gate,init", list(itertools.product(
    [1, 63, 100, 256], [(16, 16), (60, 60), (64, 64), (16, 60)], [16, 64],
    [jnp.float32, jnp.bfloat16], [None, "weak", "strong"], [False, True])))
def test_chunked_matches_reference_full(t, dims, chunk, dtype, gate, init):
  _check_chunked(t, dims[0], dims[1], chunk, dtype, gate, init, g_heads=1)


@pytest.mark.parametrize("chunk", [32, 128])
def test_chunk_sizes(chunk):
  """The other chunk sizes (16 and 64 are in the grid), T not a multiple, 2 q/k heads for 4 v."""
  args = _inputs(8, t=150, dk=16, dv=16, gate="strong", g_heads=2, h=4)
  o, s = _op(**args, chunk_size=chunk, impl="chunked")
  o_ref, s_ref = _op(**args, impl="reference")
  assert_rel_close(o, o_ref, 1e-5, "output")
  assert_rel_close(s, s_ref, 1e-5, "state")


def _naive(q, k, v, beta, g, scale, s0):
  """The contract written out in float64 numpy, one head and one token at a time."""
  q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
  b, t, gh, _ = q.shape
  h = v.shape[2]
  g = np.zeros(beta.shape) if g is None else np.asarray(g, np.float64)
  s = np.array(s0, np.float64)
  o = np.zeros(v.shape)
  for bi in range(b):
    for j in range(h):
      i = j // (h // gh)                                     # value head j reads q/k head i
      for ti in range(t):
        s[bi, j] *= np.exp(g[bi, ti, j])
        err = v[bi, ti, j] - k[bi, ti, i] @ s[bi, j]
        s[bi, j] += np.outer(k[bi, ti, i], beta[bi, ti, j] * err)
        o[bi, ti, j] = scale * q[bi, ti, i] @ s[bi, j]
  return o, s


@pytest.mark.parametrize("gate", [None, "strong"])
def test_reference_matches_contract(gate):
  """Both impls against an explicit loop over the documented recurrence (grouped heads)."""
  args = _inputs(1, t=9, dk=4, dv=3, gate=gate, b=2, g_heads=2, h=4)
  o_np, s_np = _naive(args["q"], args["k"], args["v"], args["beta"], args["g"], 4 ** -0.5,
                      args["initial_state"])
  for impl in ("reference", "chunked"):
    o, s = _op(**args, chunk_size=4, impl=impl)
    assert_rel_close(o, o_np, 1e-5, f"{impl} output")
    assert_rel_close(s, s_np, 1e-5, f"{impl} state")


@pytest.mark.parametrize("impl,gate", [("chunked", "strong"), ("reference", "weak"),
                                       ("chunked", None)])
def test_split_equals_whole(impl, gate):
  args = _inputs(2, t=100, dk=16, dv=16, gate=gate)
  o, s = _op(**args, chunk_size=16, impl=impl)
  cut = 37
  first = {n: x if n == "initial_state" or x is None else x[:, :cut] for n, x in args.items()}
  second = {n: x if x is None else x[:, cut:] for n, x in args.items() if n != "initial_state"}
  o1, s1 = _op(**first, chunk_size=16, impl=impl)
  o2, s2 = _op(**second, initial_state=s1, chunk_size=16, impl=impl)
  assert_rel_close(jnp.concatenate([o1, o2], axis=1), o, 1e-5, "split output")
  assert_rel_close(s2, s, 1e-5, "split state")


def test_reset_forgets_the_past():
  """g = -inf at token r: outputs from r on equal a fresh run over the suffix, grads finite."""
  args = _inputs(3, t=50, dk=16, dv=16, gate="weak")
  r = 21
  args["g"] = args["g"].at[:, r].set(-jnp.inf)
  o, s = _op(**args, chunk_size=16, impl="chunked")
  suffix = {n: x[:, r:] for n, x in args.items() if n != "initial_state"}
  o_fresh, s_fresh = _op(**suffix, chunk_size=16, impl="chunked")
  # exp(LOG_GATE_FLOOR) ~ 1e-35 of the old state survives: far below float32 resolution.
  assert_rel_close(o[:, r:], o_fresh, 1e-6, "output after reset")
  assert_rel_close(s, s_fresh, 1e-6, "state after reset")
  def after_reset(a):
    o, s = _op(**a, chunk_size=16, impl="chunked")
    return jnp.sum(o[:, r:]) + jnp.sum(s)

  grads = jax.grad(after_reset)(args)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(grads))
  # What crosses the reset is scaled by exp(LOG_GATE_FLOOR) ~ 1e-35.
  assert float(jnp.max(jnp.abs(grads["initial_state"]))) < 1e-30, "reset must cut the gradient"


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_matches_eager_reference(self):
    args = _inputs(4, t=40, dk=16, dv=16, gate="strong")
    f = self.variant(functools.partial(delta_rule, chunk_size=16, impl="chunked"))
    o, s = f(**args)
    o_ref, s_ref = _op(**args, impl="reference")
    assert_rel_close(o, o_ref, 1e-5, "output")
    assert_rel_close(s, s_ref, 1e-5, "state")


def test_auto_and_default_scale():
  args = _inputs(5, t=20, dk=16, dv=8, gate="weak")
  o_auto, _ = _op(**args)
  o_ref, _ = _op(**args, scale=16 ** -0.5, impl="reference")
  assert_rel_close(o_auto, o_ref, 1e-5, "auto output")
  o_two, _ = _op(**args, scale=2.0, impl="reference")
  assert_rel_close(o_two, o_ref * (2.0 / 16 ** -0.5), 1e-6, "scale is a plain factor")


def test_unknown_impl_names_the_built_ones():
  # impl="pallas" is built: tests/kernels_pallas/test_delta_rule_kernel.py checks it.
  args = _inputs(6, t=4, dk=4, dv=4, gate=None)
  with pytest.raises(ValueError, match="unknown impl.*pallas"):
    delta_rule(**args, impl="triton")


def test_shape_errors_name_the_value():
  args = _inputs(7, t=4, dk=4, dv=4, gate="weak", g_heads=2, h=2)
  with pytest.raises(ValueError, match="beta"):
    delta_rule(**{**args, "beta": args["beta"][..., :1]})
  with pytest.raises(ValueError, match="g must be"):
    delta_rule(**{**args, "g": args["g"][..., None]})
  with pytest.raises(ValueError, match="divide"):
    delta_rule(**{**args, "v": jnp.zeros((1, 4, 3, 4)), "initial_state": None})
  with pytest.raises(ValueError, match="initial_state"):
    delta_rule(**{**args, "initial_state": jnp.zeros((1, 2, 4, 5))})
