"""kernels_pallas/rwkv6 (`rwkv6(..., impl="pallas")`) against the float32 reference scan:
outputs, final state and the gradients of r, k, v, w, u and the initial state; awkward T and
head dims, float32 and bfloat16, weak and strong decays with -inf resets.

`TestRwkv6Pallas` runs the compiled kernels (GPU only); its twin `TestRwkv6PallasInterpret`
runs the same bodies in interpret mode on the CPU (sampled grid by default, full grid slow).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.rwkv6 import ops as rwkv6_pallas
from seqmix.ops import _chunk
from seqmix.ops.linear_attention import rwkv6
from seqmix.testing import RTOL, assert_trees_rel_close

B, H, V = 1, 2, 60

_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _inputs(strength, t, k_dim, dtype, with_h0, seed=0):
  """weak: log-sigmoid(N(0,1) + 3); strong: log-sigmoid(N(0,1)) / 0.05 (-14 a step on average)
  with -inf resets at ~5% of the entries."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 9)
  r = jax.random.normal(ks[0], (B, t, H, k_dim)).astype(dtype)
  k = jax.random.normal(ks[1], (B, t, H, k_dim)).astype(dtype)
  v = jax.random.normal(ks[2], (B, t, H, V)).astype(dtype)
  x = jax.random.normal(ks[3], (B, t, H, k_dim))
  if strength == "weak":
    w = jax.nn.log_sigmoid(x + 3.0)
  else:
    w = jnp.where(jax.random.uniform(ks[7], x.shape) < 0.05, -jnp.inf, jax.nn.log_sigmoid(x) / 0.05)
  u = jax.random.normal(ks[8], (H, k_dim))
  h0 = jax.random.normal(ks[4], (B, H, k_dim, V)) if with_h0 else None
  cts = (jax.random.normal(ks[5], (B, t, H, V)).astype(dtype),
         jax.random.normal(ks[6], (B, H, k_dim, V)))
  return (r, k, v, w.astype(dtype), u, h0), cts


def _pallas_fn(interpret, **blocks):
  def f(r, k, v, w, u, h0):
    if h0 is None:
      h0 = jnp.zeros((r.shape[0], H, r.shape[3], V), jnp.float32)
    return rwkv6_pallas.rwkv6(r, k, v, _chunk.clamp_log_gate(w.astype(jnp.float32)),
                              u.astype(jnp.float32), h0, scale=1.0, interpret=interpret,
                              **blocks)
  return f


def _reference_fn(r, k, v, w, u, h0):
  return rwkv6(r, k, v, w, u, initial_state=h0, impl="reference")


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


def _check(fn, strength, t, k_dim, dtype, with_h0):
  args, cts = _inputs(strength, t, k_dim, dtype, with_h0)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  ref = _run(_reference_fn, tuple(map(f32, args)), tuple(map(f32, cts)))
  out, grads = _run(fn, args, cts)
  assert out[0].dtype == args[2].dtype and out[1].dtype == jnp.float32
  assert all(gr.dtype == a.dtype for gr, a in zip(grads, args) if a is not None)
  assert_trees_rel_close((out, grads), ref, RTOL[jnp.dtype(dtype).name], "rwkv6")


_SAMPLE = [("strong", 100, 60, jnp.float32, True),
           ("weak", 63, 64, jnp.bfloat16, False),
           ("strong", 256, 64, jnp.bfloat16, True)]
_GRID = list(itertools.product(("weak", "strong"), (63, 100, 256), (60, 64),
                               (jnp.float32, jnp.bfloat16), (False, True)))
_AXES = "strength,t,k_dim,dtype,with_h0"


class TestRwkv6Pallas:
  """The compiled kernels (GPU): skipped elsewhere."""
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _backend(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Pallas rwkv6 kernels run on GPU only (interpret twin runs on CPU)")

  @pytest.mark.parametrize(_AXES, _SAMPLE)
  def test_pallas_matches_reference(self, strength, t, k_dim, dtype, with_h0):
    _check(_pallas_fn(self.INTERPRET), strength, t, k_dim, dtype, with_h0)

  @pytest.mark.slow
  @pytest.mark.parametrize(_AXES, _GRID)
  def test_pallas_matches_reference_full_grid(self, strength, t, k_dim, dtype, with_h0):
    if not self.INTERPRET:
      pytest.skip("the GPU runs the sampled grid (device time is scarce); the full grid runs "
                  "in interpret mode")
    _check(_pallas_fn(self.INTERPRET), strength, t, k_dim, dtype, with_h0)

  @pytest.mark.slow
  @pytest.mark.parametrize("options", [{}, {"forward": "seq"}, {"super_chunk": 32}])
  def test_chunk_and_block_sizes(self, options):
    """Chunk 32 and V blocks of 16 (four programs per head: their dr, dk, dw, du parts summed);
    the first ("seq") forward; a super-chunk of one chunk."""
    _check(_pallas_fn(self.INTERPRET, chunk_size=32, block_v=16, **options), "strong", 40, 60,
           jnp.float32, True)


class TestRwkv6PallasInterpret(TestRwkv6Pallas):
  INTERPRET = True


def test_dispatch_runs_the_kernel():
  """seqmix.ops rwkv6(impl="pallas") reaches the kernel (interpret mode on CPU) and matches."""
  (r, k, v, w, u, h0), _ = _inputs("strong", 20, 16, jnp.float32, True)
  got = jax.jit(functools.partial(rwkv6, impl="pallas"))(r, k, v, w, u, initial_state=h0)
  want = rwkv6(r, k, v, w, u, initial_state=h0, impl="reference")
  assert_trees_rel_close(got, want, RTOL["float32"], "rwkv6 pallas")
