"""seqmix.ops.linear_attention.gla: chunked vs the reference scan (outputs, final state, all
gradients), the reference vs a plain numpy loop of the contract, split sequences, jit, errors."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops.linear_attention import gla
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

B, H, V = 2, 2, 16


def _gates(key, kind, strength, t, k_dim, dtype):
  """Natural-log gates of `kind` ('none' | 'fixed' | 'scalar' | 'key').

  weak: log-sigmoid(N(0, 1) + 3) (~ -0.05 a step); strong: log-sigmoid(N(0, 1)) / 0.05 (-14 a
  step on average, down to ~ -100) with -inf resets at ~5% of the entries.
  """
  shape = {"none": None, "fixed": (H,), "scalar": (B, t, H), "key": (B, t, H, k_dim)}[kind]
  if shape is None:
    return None
  x = jax.random.normal(key, shape)
  if strength == "weak":
    return jax.nn.log_sigmoid(x + 3.0).astype(dtype)
  g = jax.nn.log_sigmoid(x) / 0.05
  reset = jax.random.uniform(jax.random.fold_in(key, 1), shape) < 0.05
  return jnp.where(reset, -jnp.inf, g).astype(dtype)


def _inputs(seed, kind, strength, t, k_dim, groups, dtype, with_h0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q = jax.random.normal(ks[0], (B, t, groups, k_dim)).astype(dtype)
  k = jax.random.normal(ks[1], (B, t, groups, k_dim)).astype(dtype)
  v = jax.random.normal(ks[2], (B, t, H, V)).astype(dtype)
  g = _gates(ks[3], kind, strength, t, k_dim, dtype)
  h0 = jax.random.normal(ks[4], (B, H, k_dim, V)) if with_h0 else None
  ct_o = jax.random.normal(ks[5], (B, t, H, V)).astype(dtype)
  ct_s = jax.random.normal(ks[6], (B, H, k_dim, V))
  return (q, k, v, g, h0), (ct_o, ct_s)


# Compile-time budget of the CPU suite: the LLVM backend's optimisation passes dominate the
# compile of these small programs and buy nothing at these sizes (HLO-level passes still run).
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _value_and_vjp(args, cts, impl, chunk_size):
  def f(q, k, v, g, h0):
    return gla(q, k, v, g, initial_state=h0, chunk_size=chunk_size, impl=impl)
  out, vjp = jax.vjp(f, *args)
  return out, vjp(cts)


def _run(args, cts, impl, chunk_size):
  """Jitted (output, final state) and the gradients of <out, ct> w.r.t. every input and h0."""
  fn = jax.jit(functools.partial(_value_and_vjp, impl=impl, chunk_size=chunk_size))
  return fn.lower(args, cts).compile(compiler_options=_FAST_COMPILE)(args, cts)


def _check(kind, strength, t, k_dim, chunk_size, dtype, with_h0, groups=H, seed=0):
  args, cts = _inputs(seed, kind, strength, t, k_dim, groups, dtype, with_h0)
  # The oracle runs on the same values in float32; `chunked` runs in the inputs' dtype.
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  ref_args = tuple(map(f32, args))
  if kind == "fixed":
    # The same gate as [B, T, H] gives the same outputs and q/k/v/h0 gradients, and the B·T
    # per-token gate gradients whose sum the [H] gradient is (checked below).
    per_token = jnp.broadcast_to(ref_args[3], (B, t, H))
    ref_args = ref_args[:3] + (per_token,) + ref_args[4:]
  ref_out, ref_grads = _run(ref_args, tuple(map(f32, cts)), "reference", chunk_size)
  out, grads = _run(args, cts, "chunked", chunk_size)
  rtol = RTOL[jnp.dtype(dtype).name]
  assert out[0].dtype == args[2].dtype and out[1].dtype == jnp.float32
  assert_trees_rel_close(out, ref_out, rtol, "outputs")
  if kind != "fixed":
    assert_trees_rel_close(grads, ref_grads, rtol, "grads")
    return
  # A fixed [H] gate's gradient is a sum of B·T per-token terms. In bf16 each term is known
  # only to rtol of its own size, and the terms cancel (‖terms‖ / ‖sum‖ of 5 and more here), so
  # the sum is not known to rtol of itself and a comparison with the oracle's [H] gradient
  # would need a tolerance rtol · ‖terms‖ / ‖sum‖, loose enough to hide a wrong accumulation.
  # Instead: (a) the op's per-token terms — its gradient for the same gate given as [B, T, H]
  # in float32 (the op casts gates to float32 first, so the rest of the computation is the one
  # of the [H] run) — match the oracle's at rtol, as any scalar gate's do; (b) the [H]
  # gradient is their float64 sum up to its own final rounding to the gate's dtype (at most
  # 2^-8 relative in bf16, 2^-24 in float32) plus the float32 summation (at most
  # B·T · 2^-24 of Σ|terms|), per head. A term dropped or counted twice fails by far; a running
  # bf16 sum over T fails too (0.8% off on head 0 of the sampled case, where the bound above
  # allows 0.4% and rtol · ‖terms‖ / ‖sum‖ would allow 2%).
  assert_trees_rel_close(grads[:3] + grads[4:], ref_grads[:3] + ref_grads[4:], rtol, "grads")
  _, (*_, terms, _) = _run(args[:3] + (per_token,) + args[4:], cts, "chunked", chunk_size)
  assert_rel_close(terms, ref_grads[3], rtol, "per-token grads[g]")
  terms = np.asarray(terms, np.float64)
  want = terms.sum(axis=(0, 1))                                        # [h]
  unit = {"bfloat16": 2.0 ** -8, "float32": 2.0 ** -24}[jnp.dtype(dtype).name]
  slack = unit * np.abs(want) + B * t * 2.0 ** -24 * np.abs(terms).sum(axis=(0, 1))
  got = np.asarray(grads[3], np.float64)
  assert np.all(np.abs(got - want) <= slack), (
      f"grads[g]: {got} vs the float64 sum of the per-token gradients {want}; "
      f"|diff| {np.abs(got - want)} > allowed {slack}")


# The default run samples the grid so that every value of every axis appears at least once:
# (gate kind, strength, T, K, chunk, dtype, initial state, q/k heads).
_SAMPLE = [
    ("key", "strong", 100, 60, 64, jnp.float32, True, 1),
    ("key", "weak", 63, 16, 16, jnp.bfloat16, False, 2),
    ("key", "strong", 1, 64, 64, jnp.float32, False, 2),
    ("key", "strong", 100, 16, 36, jnp.float32, True, 2),     # chunk 36: sub-chunks of 6
    ("scalar", "strong", 63, 64, 16, jnp.float32, False, 1),
    ("scalar", "strong", 100, 60, 64, jnp.bfloat16, True, 2),
    ("fixed", "strong", 63, 16, 64, jnp.bfloat16, True, 1),   # [H] gate: B·T-term grad sum
    ("none", "weak", 256, 60, 16, jnp.float32, True, 2),
]


@pytest.mark.parametrize("kind,strength,t,k_dim,chunk_size,dtype,with_h0,groups", _SAMPLE)
def test_chunked_matches_reference(kind, strength, t, k_dim, chunk_size, dtype, with_h0, groups):
  _check(kind, strength, t, k_dim, chunk_size, dtype, with_h0, groups)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,strength,t,k_dim,chunk_size,dtype,with_h0",
    [c for c in itertools.product(("none", "fixed", "scalar", "key"), ("weak", "strong"),
                                  (1, 63, 100, 256), (16, 60, 64), (16, 64),
                                  (jnp.float32, jnp.bfloat16), (False, True))
     if not (c[0] == "none" and c[1] == "strong")])
def test_chunked_matches_reference_full_grid(kind, strength, t, k_dim, chunk_size, dtype, with_h0):
  _check(kind, strength, t, k_dim, chunk_size, dtype, with_h0, groups=1 if t % 2 else 2)


def _numpy_gla(q, k, v, g, h0, scale):
  """The contract written out token by token in float64 numpy (no JAX, no chunking)."""
  q, k, v, h0 = (np.asarray(x, np.float64) for x in (q, k, v, h0))
  b, t, gk, kd = q.shape
  h = v.shape[2]
  s = h0.copy()
  o = np.zeros(v.shape)
  for i in range(t):
    for j in range(h):
      qj, kj = q[:, i, j // (h // gk)], k[:, i, j // (h // gk)]       # [b, k]
      gate = np.broadcast_to(np.asarray(g(i, j), np.float64), (b, kd))
      s[:, j] = np.exp(gate)[:, :, None] * s[:, j] + kj[:, :, None] * v[:, i, j][:, None, :]
      o[:, i, j] = scale * np.einsum("bk,bkv->bv", qj, s[:, j])
  return o, s


@pytest.mark.parametrize("kind", ["none", "fixed", "scalar", "key"])
def test_reference_matches_numpy_loop(kind):
  """Conventions: decay, then write, then read; default scale K**-0.5; head j uses q/k head
  j // (H/G); gate shapes."""
  t, kd, heads = 5, 8, 4
  ks = jax.random.split(jax.random.PRNGKey(1), 5)
  q = jax.random.normal(ks[0], (B, t, 2, kd))
  k = jax.random.normal(ks[1], (B, t, 2, kd))
  v = jax.random.normal(ks[2], (B, t, heads, V))
  h0 = jax.random.normal(ks[4], (B, heads, kd, V))
  shape = {"none": None, "fixed": (heads,), "scalar": (B, t, heads), "key": (B, t, heads, kd)}
  g = None if kind == "none" else jax.nn.log_sigmoid(jax.random.normal(ks[3], shape[kind]))
  gn = None if g is None else np.asarray(g)
  gate = {"none": lambda i, j: 0.0, "fixed": lambda i, j: gn[j],
          "scalar": lambda i, j: gn[:, i, j, None], "key": lambda i, j: gn[:, i, j]}[kind]
  want_o, want_s = _numpy_gla(q, k, v, gate, h0, kd ** -0.5)
  for impl in ("reference", "chunked"):
    o, s = jax.jit(functools.partial(gla, impl=impl, chunk_size=16))(q, k, v, g, initial_state=h0)
    assert_rel_close(o, want_o, 1e-5, f"{impl} output")
    assert_rel_close(s, want_s, 1e-5, f"{impl} state")


@pytest.mark.parametrize("kind", ["scalar", "key"])
def test_split_sequence_equals_whole(kind):
  """First 37 tokens -> state -> the other 63 from it equals the 100 tokens at once."""
  (q, k, v, g, h0), _ = _inputs(2, kind, "strong", 100, 60, 1, jnp.float32, True)
  run = jax.jit(functools.partial(gla, chunk_size=16, impl="chunked"))
  o, s = run(q, k, v, g, initial_state=h0)
  cut = lambda x, sl: x[:, sl]
  o1, s1 = run(cut(q, slice(0, 37)), cut(k, slice(0, 37)), cut(v, slice(0, 37)),
               cut(g, slice(0, 37)), initial_state=h0)
  o2, s2 = run(cut(q, slice(37, None)), cut(k, slice(37, None)), cut(v, slice(37, None)),
               cut(g, slice(37, None)), initial_state=s1)
  assert_rel_close(jnp.concatenate([o1, o2], axis=1), o, 1e-5, "output")
  assert_rel_close(s2, s, 1e-5, "final state")


@pytest.mark.parametrize("use_jit", [False, True])
def test_jit_and_eager_match_reference(use_jit):
  (q, k, v, g, h0), _ = _inputs(3, "key", "weak", 20, 16, 2, jnp.float32, True)
  op = functools.partial(gla, chunk_size=16)   # impl="auto" -> chunked
  op = jax.jit(op) if use_jit else op
  got = op(q, k, v, g, initial_state=h0)
  want = gla(q, k, v, g, initial_state=h0, impl="reference")
  assert_trees_rel_close(got, want, 1e-5, "gla")


@pytest.mark.parametrize("bad,match", [
    ({"g": jnp.zeros((3,))}, "g must be"),
    ({"g": jnp.zeros((B, 4, H, 16, 1))}, "g must be"),
    ({"v": jnp.zeros((B, 4, 3, V))}, "must divide"),
    ({"initial_state": jnp.zeros((B, H, 16, V + 1))}, "initial_state must be"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_arguments_say_what_is_expected(bad, match):
  (q, k, v, g, _), _ = _inputs(0, "scalar", "weak", 4, 16, 2, jnp.float32, False)
  kw = {"v": v, "g": g, **bad}
  with pytest.raises(ValueError, match=match):
    gla(q, k, kw.pop("v"), kw.pop("g"), **kw)
