"""kernels_pallas/delta_rule (`delta_rule(..., impl="pallas")`) against the float32 reference
scan: outputs, final state and the gradients of every input (q, k, v, beta, g, initial state),
with and without the gate; awkward T and head dims, float32 and bfloat16, strong gates with
-inf resets, grouped q/k heads; both backwards (the kernel, default, and "jax").

`TestDeltaRulePallas` runs the compiled kernels (GPU only); its twin
`TestDeltaRulePallasInterpret` runs the same bodies in interpret mode on the CPU (the default
suite samples the grid; the full grid is slow).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.delta_rule import ops as delta_pallas
from seqmix.ops import _chunk
from seqmix.ops.delta_rule import delta_rule
from seqmix.testing import RTOL, assert_trees_rel_close

B, H = 1, 2

# The LLVM backend's optimisation passes dominate the compile of these small CPU programs.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _gates(key, kind, t, dtype):
  """weak: log-sigmoid(N(0,1) + 3) (~ -0.05 a step); strong: log-sigmoid(N(0,1)) / 0.05 (-14 a
  step on average, often below -20) with -inf resets at ~5% of the entries."""
  if kind == "none":
    return None
  x = jax.random.normal(key, (B, t, H))
  if kind == "weak":
    return jax.nn.log_sigmoid(x + 3.0).astype(dtype)
  g = jax.nn.log_sigmoid(x) / 0.05
  reset = jax.random.uniform(jax.random.fold_in(key, 1), (B, t, H)) < 0.05
  return jnp.where(reset, -jnp.inf, g).astype(dtype)


def _inputs(kind, t, dim, groups, dtype, with_h0, seed=0):
  """q, k `[B, T, groups, dim]` (k L2-normalised, as the op's contract expects), v `[B, T, H,
  dim]`, beta = sigmoid(N(0, 1)), the gate, h0; cotangents of (o, final state)."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (B, t, groups, dim)).astype(dtype)
  k = jax.random.normal(ks[1], (B, t, groups, dim))
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  v = jax.random.normal(ks[2], (B, t, H, dim)).astype(dtype)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, t, H))).astype(dtype)
  g = _gates(ks[4], kind, t, dtype)
  h0 = jax.random.normal(ks[5], (B, H, dim, dim)) if with_h0 else None
  cts = (jax.random.normal(ks[6], (B, t, H, dim)).astype(dtype),
         jax.random.normal(ks[7], (B, H, dim, dim)))
  return (q, k, v, beta, g, h0), cts


def _pallas_fn(interpret, **blocks):
  """delta_rule through the kernels with an explicit interpret flag (seqmix.ops picks it by
  backend) and static blocks."""
  def f(q, k, v, beta, g, h0):
    b, _, _, kd = q.shape
    h, vd = v.shape[2], v.shape[3]
    if g is not None:
      g = _chunk.clamp_log_gate(g.astype(jnp.float32))
    if h0 is None:
      h0 = jnp.zeros((b, h, kd, vd), jnp.float32)
    return delta_pallas.delta_rule(q, k, v, beta, g, h0, scale=kd ** -0.5, interpret=interpret,
                                   **blocks)
  return f


def _reference_fn(q, k, v, beta, g, h0):
  return delta_rule(q, k, v, beta, g, initial_state=h0, impl="reference")


def _run(fn, args, cts):
  def value_and_grads(args, cts):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cts)
  jitted = jax.jit(value_and_grads)
  # The oracle at full float32 precision on every backend (GPUs default to TF32); the kernels
  # choose their own dot precision.
  with jax.default_matmul_precision("highest"):
    if jax.default_backend() != "cpu":
      return jitted(args, cts)
    return jitted.lower(args, cts).compile(compiler_options=_FAST_COMPILE)(args, cts)


def _check(fn, kind, t, dim, dtype, with_h0, groups):
  args, cts = _inputs(kind, t, dim, groups, dtype, with_h0)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  ref_out, ref_grads = _run(_reference_fn, tuple(map(f32, args)), tuple(map(f32, cts)))
  out, grads = _run(fn, args, cts)
  rtol = RTOL[jnp.dtype(dtype).name]
  assert out[0].dtype == args[2].dtype and out[1].dtype == jnp.float32
  assert out[0].shape == args[2].shape and out[1].shape == ref_out[1].shape
  assert all(gr.dtype == a.dtype for gr, a in zip(grads, args) if a is not None)
  assert_trees_rel_close(out, ref_out, rtol, "outputs")
  assert_trees_rel_close(grads, ref_grads, rtol, "grads")


# Every value of every axis at least once: (gate, T, K = V, dtype, initial state, groups).
_SAMPLE = [
    ("strong", 100, 60, jnp.float32, True, 1),
    ("strong", 63, 64, jnp.bfloat16, False, 2),
    ("none", 100, 60, jnp.bfloat16, True, 2),
    pytest.param("weak", 100, 64, jnp.float32, True, 1, marks=pytest.mark.slow),
]
_GRID = list(itertools.product(("none", "weak", "strong"), (63, 100), (60, 64),
                               (jnp.float32, jnp.bfloat16), (False, True), (1, 2)))
_AXES = "kind,t,dim,dtype,with_h0,groups"


class TestDeltaRulePallas:
  """The compiled kernels (GPU): skipped elsewhere."""
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _backend(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Pallas delta_rule kernels run on GPU only (interpret twin runs on "
                  "CPU)")

  @pytest.mark.parametrize(_AXES, _SAMPLE)
  def test_pallas_matches_reference(self, kind, t, dim, dtype, with_h0, groups):
    # The GPU runs the defaults (float32 inputs take backward="jax": the backward kernel's
    # float32 tiles exceed the H200's shared memory); interpreted, the backward kernel is
    # checked in float32 too.
    opts = {"backward": "pallas"} if self.INTERPRET else {}
    _check(_pallas_fn(self.INTERPRET, **opts), kind, t, dim, dtype, with_h0, groups)

  @pytest.mark.slow
  @pytest.mark.parametrize("backward", ["pallas", "jax"])
  @pytest.mark.parametrize(_AXES, _GRID)
  def test_pallas_matches_reference_full_grid(self, kind, t, dim, dtype, with_h0, groups,
                                              backward):
    if not self.INTERPRET:
      pytest.skip("the GPU runs the sampled grid (device time is scarce); the full grid runs "
                  "in interpret mode")
    _check(_pallas_fn(self.INTERPRET, backward=backward), kind, t, dim, dtype, with_h0, groups)

  @pytest.mark.parametrize("kind,dtype", [("strong", jnp.float32),
                                          pytest.param("none", jnp.bfloat16,
                                                       marks=pytest.mark.slow)])
  def test_jax_backward(self, kind, dtype):
    """backward="jax" (the forward kernel, then the VJP of the chunked form): the fallback."""
    _check(_pallas_fn(self.INTERPRET, backward="jax", chunk_size=16), kind, 40, 16, dtype,
           True, 2)

  @pytest.mark.parametrize("kind,chunk,block_v", [("weak", 16, 32),
                                                  pytest.param("none", 32, 16,
                                                               marks=pytest.mark.slow)])
  def test_chunk_and_block_sizes(self, kind, chunk, block_v):
    """Other static blocks: smaller chunks (several per sequence at T = 40) and V blocks of
    16 or 32 with V = 60 (several programs per head). Weak gates: under strong ones D, e^Γ and
    A are ~0 off the diagonal, so errors in the solve or in the decayed gradient terms hide
    (checked: dropping the last substitution step or dg's e^Γ<dS', S> term passes there)."""
    _check(_pallas_fn(self.INTERPRET, chunk_size=chunk, block_v=block_v), kind, 40, 60,
           jnp.float32, True, 1)


class TestDeltaRulePallasInterpret(TestDeltaRulePallas):
  INTERPRET = True


def test_dispatch_runs_the_kernel():
  """seqmix.ops delta_rule(impl="pallas") reaches the kernel (interpret mode on CPU) and
  matches the reference (forward), gated, with the default scale."""
  (q, k, v, beta, g, h0), _ = _inputs("strong", 20, 16, 1, jnp.float32, True)
  run = lambda impl: jax.jit(functools.partial(delta_rule, impl=impl)).lower(
      q, k, v, beta, g, initial_state=h0).compile(compiler_options=_FAST_COMPILE)(
          q, k, v, beta, g, initial_state=h0)
  with jax.default_matmul_precision("highest"):
    got, want = run("pallas"), run("reference")
  assert_trees_rel_close(got, want, RTOL["float32"], "delta_rule pallas")


@pytest.mark.parametrize("bad,match", [({"chunk_size": 48}, "power of two"),
                                       ({"block_v": 8}, "power of two"),
                                       ({"backward": "cuda"}, "backward")])
def test_bad_static_options_say_what_is_expected(bad, match):
  z = jnp.zeros((1, 4, 1, 16))
  with pytest.raises(ValueError, match=match):
    delta_pallas.delta_rule(z, z, z, jnp.zeros((1, 4, 1)), None, jnp.zeros((1, 1, 16, 16)),
                            scale=1.0, interpret=True, **bad)
