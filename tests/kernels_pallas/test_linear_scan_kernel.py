"""linear_scan Pallas kernel against the `reference` oracle (outputs, final state, all gradients).

`TestLinearScanPallas` runs the compiled kernel and only on a GPU; `TestLinearScanPallasInterpret`
runs the same body in the Pallas interpreter on any backend (CI). `test_triton_lowering` lowers
the GPU kernels to Triton IR on this CPU-only machine (compiling the IR needs a GPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.linear_scan import ops as kernel_ops
from kernels_pallas.linear_scan.kernel import ScanConfig
from seqmix.ops.scan import linear_scan
from seqmix.testing import RTOL, assert_rel_close

F32 = RTOL["float32"]


def _inputs(seed, shape, kind, dtype=jnp.float32, strong=False):
  """a mixed-sign real with exact zeros (resets), or complex |a| < 1; x, h0 random."""
  rng = np.random.default_rng(seed)
  state = (shape[0],) + shape[2:]
  if kind == "real":
    a = rng.uniform(-1.0, 1.0, shape)
    x, h0 = rng.normal(size=shape), rng.normal(size=state)
  else:
    a = rng.uniform(0.5, 0.999, shape) * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
    x = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    h0 = rng.normal(size=state) + 1j * rng.normal(size=state)
  a[rng.random(shape) < 0.05] = 0.0
  if strong:  # e^-20 decays (and their negatives) beside the resets
    a[rng.random(shape) < 0.3] = np.exp(-20.0) * rng.choice([-1.0, 1.0])
    a[rng.random(shape) < 0.2] = rng.choice([-1.0, 1.0])  # |a| = 1: no decay at all
  if kind == "real":
    return jnp.asarray(a, dtype), jnp.asarray(x, dtype), jnp.asarray(h0, jnp.float32)
  return (jnp.asarray(a, jnp.complex64), jnp.asarray(x, jnp.complex64),
          jnp.asarray(h0, jnp.complex64))


def _vjp(fn, a, x, h0, seed):
  """(h, h_T) and the VJP of random cotangents on both w.r.t. (a, x, h0), upcast."""
  (h, ht), vjp = jax.vjp(fn, a, x, h0)
  rng = np.random.default_rng(seed + 1)
  cot = lambda v: jnp.asarray(rng.normal(size=v.shape) + (1j * rng.normal(size=v.shape)
                                                          if jnp.iscomplexobj(v) else 0), v.dtype)
  grads = vjp((cot(h), cot(ht)))
  up = lambda v: v.astype(jnp.complex64 if jnp.iscomplexobj(v) else jnp.float32)
  return [up(h), up(ht)] + [up(g) for g in grads]


def _reference(a, x, h0):
  return linear_scan(a, x, initial_state=h0, impl="reference")


class TestLinearScanPallas:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _backend(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("the compiled kernel needs a GPU; the Interpret twin runs the same body")

  def _interpret_only(self):
    """Small-tile configs: the interpreter's cases. Compiled, the default-config tests cover
    the same paths, and every extra config is two more Triton compiles on the device."""
    if not self.INTERPRET:
      pytest.skip("small-tile config: interpret only (compiled runs the default config)")

  def _kernel(self, cfg):
    def fn(a, x, h0):
      return kernel_ops.linear_scan(a.astype(h0.dtype), x.astype(h0.dtype), h0, config=cfg,
                                    interpret=self.INTERPRET)
    return fn

  def _check(self, shape, kind, dtype=jnp.float32, cfg=None, strong=False, seed=0):
    a, x, h0 = _inputs(seed, shape, kind, dtype, strong)
    got = _vjp(self._kernel(cfg), a, x, h0, seed)
    want = _vjp(lambda a, x, h0: _reference(a.astype(h0.dtype), x.astype(h0.dtype), h0),
                a, x, h0, seed)
    for name, g, w in zip(("h", "h_T", "da", "dx", "dh0"), got, want):
      # Both sides compute in float32 from the same (bf16-rounded) inputs: float32 tolerance
      # for every value, bf16 only changes which inputs are scanned.
      assert_rel_close(g, w, F32, f"{kind} {shape} {cfg} {name}")

  # Small tiles keep the interpreter fast (its compile time grows with the unrolled tile);
  # D = 40 pads to two blocks of 32, T = 63 / 100 pad to whole tiles.
  @pytest.mark.parametrize("kind,t,cfg", [
      ("real", 63, ScanConfig(block_t=4)),
      ("complex", 100, ScanConfig(block_t=8, prefetch=False)),
  ])
  def test_matches_reference(self, kind, t, cfg):
    """Mixed-sign a with resets (0), e^-20 decays and |a| = 1 steps."""
    self._interpret_only()
    self._check((2, t, 40), kind, cfg=cfg, strong=True)

  @pytest.mark.slow
  @pytest.mark.parametrize("kind,t,cfg", [
      ("real", 100, ScanConfig(block_t=8, prefetch=False)),
      ("complex", 63, ScanConfig(block_t=4)),
  ])
  @pytest.mark.parametrize("strong", [False, True])
  def test_matches_reference_grid(self, kind, t, cfg, strong):
    self._interpret_only()
    self._check((2, t, 40), kind, cfg=cfg, strong=strong, seed=3)

  @pytest.mark.slow
  def test_bfloat16_inputs(self):
    self._interpret_only()
    self._check((2, 63, 40), "real", jnp.bfloat16, cfg=ScanConfig(block_t=4), seed=5)

  @pytest.mark.slow
  def test_wide_blocks_and_one_tile(self):
    self._interpret_only()
    # block_d = 64 (two warps), a single tile longer than T (all of T is padding but 20 rows).
    self._check((1, 20, 70), "real", cfg=ScanConfig(block_d=64, block_t=32, prefetch=True),
                seed=7)

  @pytest.mark.skipif(jax.default_backend() != "gpu", reason="default tiles are slow to "
                      "interpret (~50 s): compiled only")
  @pytest.mark.parametrize("kind", ["real", "complex"])
  def test_default_config_medium(self, kind):
    """T = 1000 and D = 300 pad; resets, e^-20 decays and |a| = 1 steps."""
    self._check((4, 1000, 300), kind, strong=True, seed=11)

  def test_op_dispatch_trailing_shape(self):
    """seqmix.ops.scan.linear_scan(impl="pallas") on [B, T, 3, 5] with broadcast a."""
    rng = np.random.default_rng(9)
    a = jnp.asarray(rng.uniform(-1, 1, (2, 30, 3, 1)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 30, 3, 5)), jnp.bfloat16)
    h0 = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)

    def run(impl):
      def fn(a, x, h0):
        h, ht = linear_scan(a, x, initial_state=h0, impl=impl)
        assert h.dtype == jnp.bfloat16 and ht.dtype == jnp.float32
        return h, ht
      return _vjp(fn, a, x, h0, 9)

    for name, g, w in zip(("h", "h_T", "da", "dx", "dh0"), run("pallas"), run("reference")):
      # h is returned in bf16 on both sides; its 2^-9 rounding differs where the float32
      # values straddle a rounding boundary, so h uses the bf16 tolerance.
      assert_rel_close(g, w, RTOL["bfloat16"] if name == "h" else F32, name)


class TestLinearScanPallasInterpret(TestLinearScanPallas):
  INTERPRET = True


@pytest.fixture
def fake_h100(monkeypatch):
  """Let the Triton lowering run without a GPU: it only asks the device for its capability."""
  from jax._src.pallas.triton import gpu_info, pallas_call_registration
  info = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: info)


@pytest.mark.parametrize("dtype,cfg", [
    (jnp.float32, ScanConfig()),
    pytest.param(jnp.complex64, ScanConfig(block_t=8, prefetch=False), marks=pytest.mark.slow)])
def test_triton_lowering(fake_h100, dtype, cfg):
  """Forward and backward lower to Triton IR (every primitive has a Triton rule)."""
  a = jnp.ones((2, 64, 128), dtype)
  h0 = jnp.ones((2, 128), dtype)

  def loss(a, x, h0):
    h, ht = kernel_ops.linear_scan(a, x, h0, config=cfg)
    return jnp.sum(jnp.abs(h)) + jnp.sum(jnp.abs(ht))

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(a, a, h0).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel
