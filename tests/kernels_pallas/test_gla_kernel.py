"""kernels_pallas/gla (`gla(..., impl="pallas")`) against the float32 reference scan: outputs,
final state and the gradients of every input (initial state included), for g None, fixed [H],
scalar [B, T, H] and per-key [B, T, H, K] gates; awkward T and head dims, float32 and bfloat16,
strong gates with -inf resets, grouped q/k heads.

`TestGlaPallas` runs the compiled kernels (GPU only); its twin `TestGlaPallasInterpret` runs the
same bodies in interpret mode on the CPU (the default suite samples the grid; the full grid is
slow).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.gla import ops as gla_pallas
from seqmix.ops import _chunk
from seqmix.ops.linear_attention import gla
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

B, H, V = 1, 2, 60

# The LLVM backend's optimisation passes dominate the compile of these small CPU programs.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _gates(key, kind, strength, t, k_dim, dtype):
  """weak: log-sigmoid(N(0,1) + 3) (~ -0.05 a step); strong: log-sigmoid(N(0,1)) / 0.05 (-14 a
  step on average, down to ~ -100) with -inf resets at ~5% of the entries."""
  shape = {"none": None, "fixed": (H,), "scalar": (B, t, H), "key": (B, t, H, k_dim)}[kind]
  if shape is None:
    return None
  x = jax.random.normal(key, shape)
  if strength == "weak":
    return jax.nn.log_sigmoid(x + 3.0).astype(dtype)
  g = jax.nn.log_sigmoid(x) / 0.05
  reset = jax.random.uniform(jax.random.fold_in(key, 1), shape) < 0.05
  return jnp.where(reset, -jnp.inf, g).astype(dtype)


def _inputs(kind, strength, t, k_dim, groups, dtype, with_h0, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q = jax.random.normal(ks[0], (B, t, groups, k_dim)).astype(dtype)
  k = jax.random.normal(ks[1], (B, t, groups, k_dim)).astype(dtype)
  v = jax.random.normal(ks[2], (B, t, H, V)).astype(dtype)
  g = _gates(ks[3], kind, strength, t, k_dim, dtype)
  h0 = jax.random.normal(ks[4], (B, H, k_dim, V)) if with_h0 else None
  cts = (jax.random.normal(ks[5], (B, t, H, V)).astype(dtype),
         jax.random.normal(ks[6], (B, H, k_dim, V)))
  return (q, k, v, g, h0), cts


def _pallas_fn(interpret, **options):
  """gla through the kernels with an explicit interpret flag (seqmix.ops picks it by backend);
  a fixed gate stays [H], as seqmix.ops passes it."""
  def f(q, k, v, g, h0):
    b, t, _, kd = q.shape
    h, vd = v.shape[2], v.shape[3]
    if g is not None:
      g = _chunk.clamp_log_gate(g.astype(jnp.float32))
      if g.ndim > 1:
        g = jnp.broadcast_to(g, (b, t, h) + g.shape[3:])
    if h0 is None:
      h0 = jnp.zeros((b, h, kd, vd), jnp.float32)
    return gla_pallas.gla(q, k, v, g, h0, scale=kd ** -0.5, interpret=interpret, **options)
  return f


def _reference_fn(q, k, v, g, h0):
  return gla(q, k, v, g, initial_state=h0, impl="reference")


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


def _check(fn, kind, strength, t, k_dim, dtype, with_h0, groups):
  args, cts = _inputs(kind, strength, t, k_dim, groups, dtype, with_h0)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  ref_out, ref_grads = _run(_reference_fn, tuple(map(f32, args)), tuple(map(f32, cts)))
  out, grads = _run(fn, args, cts)
  rtol = RTOL[jnp.dtype(dtype).name]
  assert out[0].dtype == args[2].dtype and out[1].dtype == jnp.float32
  assert all(gr.dtype == a.dtype for gr, a in zip(grads, args) if a is not None)
  assert_trees_rel_close(out, ref_out, rtol, "outputs")
  if kind != "fixed":
    assert_trees_rel_close(grads, ref_grads, rtol, "grads")
    return
  # A fixed [H] gate's gradient sums B·T per-token terms, each known to `rtol` of the per-token
  # scale; where they cancel, the sum is known to rtol · ‖terms‖ / ‖sum‖. The per-token terms
  # are the oracle's gradient of the same gate given as [B, T, H].
  per_token = list(map(f32, args))
  per_token[3] = jnp.broadcast_to(per_token[3], (B, t, H))
  _, (_, _, _, terms, _) = _run(_reference_fn, tuple(per_token), tuple(map(f32, cts)))
  cancel = float(jnp.linalg.norm(terms) / jnp.maximum(jnp.linalg.norm(ref_grads[3]), 1e-30))
  assert_trees_rel_close(grads[:3] + grads[4:], ref_grads[:3] + ref_grads[4:], rtol, "grads")
  assert_rel_close(grads[3], ref_grads[3], rtol * max(1.0, cancel), "grads[g]")


# Every value of every axis at least once: (gate, strength, T, K, dtype, initial state, groups).
_SAMPLE = [
    ("scalar", "strong", 100, 60, jnp.float32, True, 1),
    ("scalar", "strong", 63, 64, jnp.bfloat16, False, 2),
    ("fixed", "weak", 256, 64, jnp.float32, True, 2),
    ("none", "weak", 63, 60, jnp.bfloat16, True, 1),
    ("key", "strong", 100, 60, jnp.float32, True, 1),
    ("key", "weak", 63, 64, jnp.bfloat16, False, 2),
]
_GRID = [c for c in itertools.product(("none", "fixed", "scalar", "key"), ("weak", "strong"),
                                      (63, 100, 256), (60, 64), (jnp.float32, jnp.bfloat16),
                                      (False, True), (1, 2))
         if not (c[0] == "none" and c[1] == "strong")]
_AXES = "kind,strength,t,k_dim,dtype,with_h0,groups"
# The first ("seq") backward of the scalar/fixed/no-gate kernels, kept for side-by-side timing;
# the default ("two_pass") runs in every case above.
_SEQ_SAMPLE = [("scalar", "strong", 100, 60, jnp.float32, True, 2)]
_SEQ_GRID = [c for c in _GRID if c[0] != "key"]


class TestGlaPallas:
  """The compiled kernels (GPU): skipped elsewhere."""
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _backend(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Pallas gla kernels run on GPU only (interpret twin runs on CPU)")

  @pytest.mark.parametrize(_AXES, _SAMPLE)
  def test_pallas_matches_reference(self, kind, strength, t, k_dim, dtype, with_h0, groups):
    # The GPU runs the defaults (float32 inputs take the sequential forward: the two-pass
    # one's float32 tiles exceed the H200's shared memory); interpreted, the two-pass forward
    # is checked in float32 too, so every dtype exercises the kernel that bfloat16 runs.
    opts = {"forward": "two_pass"} if self.INTERPRET else {}
    _check(_pallas_fn(self.INTERPRET, **opts), kind, strength, t, k_dim, dtype, with_h0,
           groups)

  # The defaults as they are on the GPU for bfloat16: fixed and scalar gates take the
  # sequential forward with the two-pass backward (ops.gla's `forward=None`).
  @pytest.mark.parametrize(_AXES, [("fixed", "strong", 100, 64, jnp.bfloat16, True, 2)])
  def test_default_options_match_reference(self, kind, strength, t, k_dim, dtype, with_h0,
                                           groups):
    _check(_pallas_fn(self.INTERPRET), kind, strength, t, k_dim, dtype, with_h0, groups)

  @pytest.mark.slow
  @pytest.mark.parametrize(_AXES, _GRID)
  def test_pallas_matches_reference_full_grid(self, kind, strength, t, k_dim, dtype, with_h0,
                                              groups):
    if not self.INTERPRET:
      pytest.skip("the GPU runs the sampled grid (device time is scarce); the full grid runs "
                  "in interpret mode")
    _check(_pallas_fn(self.INTERPRET, forward="two_pass"), kind, strength, t, k_dim, dtype,
           with_h0, groups)

  @pytest.mark.parametrize(_AXES, _SEQ_SAMPLE)
  def test_seq_backward_matches_reference(self, kind, strength, t, k_dim, dtype, with_h0,
                                          groups):
    _check(_pallas_fn(self.INTERPRET, backward="seq"), kind, strength, t, k_dim, dtype,
           with_h0, groups)

  @pytest.mark.slow
  @pytest.mark.parametrize(_AXES, _SEQ_GRID)
  def test_seq_backward_full_grid(self, kind, strength, t, k_dim, dtype, with_h0, groups):
    if not self.INTERPRET:
      pytest.skip("the GPU runs the sampled grid; the full grid runs in interpret mode")
    _check(_pallas_fn(self.INTERPRET, backward="seq"), kind, strength, t, k_dim, dtype,
           with_h0, groups)

  @pytest.mark.parametrize("kind,chunk,options", [
      ("scalar", 16, {"super_chunk": 32}),
      pytest.param("scalar", 16, {"forward": "seq"}, marks=pytest.mark.slow),
      pytest.param("scalar", 16, {"backward": "seq"}, marks=pytest.mark.slow),
      ("key", 32, {"forward": "seq"}),
      pytest.param("key", 16, {"super_chunk": 16}, marks=pytest.mark.slow),
      pytest.param("key", 32, {}, marks=pytest.mark.slow)])
  def test_chunk_and_block_sizes(self, kind, chunk, options):
    """Other static blocks: V blocks of 16 with V = 60 (four programs per head, their dq, dk,
    dg parts summed), chunk 16 for the scalar gate and 32 for the per-key gate (defaults 64
    and 16), the first ("seq") schemes, super-chunks of two chunks (scalar: two of them) and
    of one chunk."""
    args, cts = _inputs(kind, "strong", 40, 60, 1, jnp.float32, True)

    def fn(q, k, v, g, h0):
      return gla_pallas.gla(q, k, v, _chunk.clamp_log_gate(g), h0, scale=60 ** -0.5,
                            chunk_size=chunk, block_v=16, interpret=self.INTERPRET, **options)
    ref_out, ref_grads = _run(_reference_fn, args, cts)
    out, grads = _run(fn, args, cts)
    assert_trees_rel_close((out, grads), (ref_out, ref_grads), RTOL["float32"], kind)


class TestGlaPallasInterpret(TestGlaPallas):
  INTERPRET = True


def test_dispatch_runs_the_kernel():
  """seqmix.ops gla(impl="pallas") reaches the kernel (interpret mode on CPU) and matches."""
  (q, k, v, g, h0), _ = _inputs("fixed", "strong", 20, 16, 1, jnp.float32, True)
  got = jax.jit(functools.partial(gla, impl="pallas"))(q, k, v, g, initial_state=h0)
  want = gla(q, k, v, g, initial_state=h0, impl="reference")
  assert_trees_rel_close(got, want, RTOL["float32"], "gla pallas")


def test_fixed_gate_stays_per_head():
  """A fixed [H] gate reaches the kernels as [H] (one chunk's [H, C] row), never as a [B, H, T]
  array or an XLA cumsum: XLA constant-folded those for seconds when the gate is a constant."""
  (q, k, v, g, h0), cts = _inputs("fixed", "weak", 100, 16, 1, jnp.float32, True)

  def loss(q, k, v, h0):
    out = gla(q, k, v, jnp.linspace(-1.0, -0.1, H), initial_state=h0, impl="pallas")
    return jnp.vdot(out[0], cts[0]) + jnp.vdot(out[1], cts[1])
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, h0)
  eqns = []
  def walk(jx):
    for e in jx.eqns:
      eqns.append(e)
      if e.primitive.name == "pallas_call":    # the kernel bodies: not XLA's to fold
        continue
      for p in e.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          if hasattr(sub, "eqns"):                                  # a Jaxpr
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):   # a ClosedJaxpr
            walk(sub.jaxpr)
  walk(jaxpr.jaxpr)
  assert not [e for e in eqns if "cum" in e.primitive.name], "a cumsum of the gate"
  # [B, T, H] / [B, H, T] (T or T padded); a fixed gate's one-row [H, C] may be broadcast.
  gate_shaped = [e for e in eqns if e.primitive.name == "broadcast_in_dim"
                 and len(e.outvars[0].aval.shape) >= 3
                 and {100, 128} & set(e.outvars[0].aval.shape)]
  assert not gate_shaped, f"a per-token gate array: {gate_shaped[0]}"


@pytest.mark.parametrize("bad,match", [({"chunk_size": 48}, "power of two"),
                                       ({"block_v": 8}, "power of two"),
                                       ({"backward": "fast"}, "backward"),
                                       ({"forward": "fast"}, "forward")])
def test_bad_blocks_say_what_is_expected(bad, match):
  z = jnp.zeros((1, 4, 1, 16))
  with pytest.raises(ValueError, match=match):
    gla_pallas.gla(z, z, z, None, jnp.zeros((1, 1, 16, 16)), scale=1.0, interpret=True, **bad)
