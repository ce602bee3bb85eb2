"""selective_scan Pallas kernel against the `reference` oracle (outputs, final state, all grads).

`TestSelectiveScanPallas` runs the compiled kernel, only on a GPU; `TestSelectiveScanPallasInterpret`
runs the same body in the Pallas interpreter (CI). `test_triton_lowering` lowers the GPU kernels
to Triton IR on a CPU-only machine (compiling the IR needs a GPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.selective_scan import ops as kernel_ops
from kernels_pallas.selective_scan.kernel import SelectiveScanConfig as Cfg
from seqmix.ops.ssm import selective_scan
from seqmix.testing import RTOL, assert_rel_close

F32 = RTOL["float32"]
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias", "initial_state")


def _inputs(seed, b, t, d, n, dtype=jnp.float32, strong=False, softplus=True):
  """Mamba-like inputs; strong: Δ up to ~e^3 and |A| ~ e^2 so exp(ΔA) underflows (resets)."""
  rng = np.random.default_rng(seed)
  delta = rng.normal(size=(b, t, d)) - 1.0 + (4.0 if strong else 0.0)
  bias = rng.normal(size=(d,)) * 0.5
  if not softplus:  # the caller supplies positive steps without the softplus
    delta, bias = np.abs(delta), np.abs(bias)
  vals = dict(u=rng.normal(size=(b, t, d)), delta=delta,
              A=-np.exp(rng.normal(size=(d, n)) + (2.0 if strong else 0.0)),
              B=rng.normal(size=(b, t, n)), C=rng.normal(size=(b, t, n)), D=rng.normal(size=(d,)),
              delta_bias=bias, initial_state=rng.normal(size=(b, d, n)))
  inp = {k: jnp.asarray(v, dtype if k in ("u", "delta", "B", "C") else jnp.float32)
         for k, v in vals.items()}
  return inp, jnp.asarray(rng.random((b, t)) < 0.1)


def _vjp(fn, inp, seed):
  out, vjp = jax.vjp(fn, *(inp[k] for k in NAMES))
  rng = np.random.default_rng(seed + 1)
  grads = vjp(tuple(jnp.asarray(rng.normal(size=o.shape), o.dtype) for o in out))
  return [o.astype(jnp.float32) for o in out], [g.astype(jnp.float32) for g in grads]


class TestSelectiveScanPallas:
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

  def _check(self, shape, cfg=None, dtype=jnp.float32, softplus=True, strong=False,
             with_reset=True, seed=0):
    inp, reset = _inputs(seed, *shape, dtype=dtype, strong=strong, softplus=softplus)
    reset = reset if with_reset else None

    def kernel(*vals):
      kw = dict(zip(NAMES, vals))
      y, h = kernel_ops.selective_scan(
          kw.pop("u"), kw.pop("delta"), kw.pop("A"), kw.pop("B"), kw.pop("C"), kw.pop("D"),
          delta_softplus=softplus, reset=reset, config=cfg, interpret=self.INTERPRET, **kw)
      return y.astype(vals[0].dtype), h  # as the op: y in u's dtype (so is its cotangent)

    def reference(*vals):
      kw = dict(zip(NAMES, vals))
      return selective_scan(kw.pop("u"), kw.pop("delta"), kw.pop("A"), kw.pop("B"), kw.pop("C"),
                            kw.pop("D"), delta_softplus=softplus, reset=reset,
                            impl="reference", **kw)

    out, grads = _vjp(kernel, inp, seed)
    with jax.default_matmul_precision("highest"):  # the reference's einsum, not TF32 on GPU
      ref_out, ref_grads = _vjp(reference, inp, seed)
    # Both sides compute in float32 from the same (bf16-rounded) inputs and return y in u's
    # dtype: y at u's dtype tolerance, the float32 state at float32's.
    assert_rel_close(out[0], ref_out[0], RTOL[jnp.dtype(dtype).name], f"{shape} y")
    assert_rel_close(out[1], ref_out[1], F32, f"{shape} h_T")
    for k, g, w in zip(NAMES, grads, ref_grads):
      # The kernel's gradients are float32; the reference's for bf16 inputs are bf16-rounded.
      tol = RTOL[jnp.dtype(dtype).name] if k in ("u", "delta", "B", "C") else F32
      assert_rel_close(g, w, tol, f"{shape} {cfg} d{k}")

  # T = 23 pads to whole chunks, D = 40 to two blocks of 32, N = 5 to 8 (a power of two).
  def test_matches_reference(self):
    self._interpret_only()
    self._check((2, 23, 40, 5), Cfg(block_t=4, prefetch=True))

  # v2 backward: a checkpoint every 2 forward chunks (pl.when), and 2 checkpoints per chunk.
  @pytest.mark.parametrize("cfg", [
      Cfg(block_t=2, backward="v2", bwd_block_t=4),
      pytest.param(Cfg(block_t=4, prefetch=False, backward="v2", bwd_block_t=2),
                   marks=pytest.mark.slow)])
  def test_backward_v2(self, cfg):
    self._interpret_only()
    self._check((1, 15, 33, 4), cfg, seed=2)

  @pytest.mark.slow
  def test_strong_decays_no_softplus(self):
    self._interpret_only()
    self._check((1, 19, 33, 4), Cfg(block_t=4, prefetch=False), softplus=False, strong=True,
                seed=3)

  @pytest.mark.slow
  @pytest.mark.parametrize("with_reset", [False, True])
  def test_matches_reference_t100(self, with_reset):
    self._interpret_only()
    self._check((2, 100, 60, 16), Cfg(block_t=8), with_reset=with_reset, seed=5)

  @pytest.mark.slow
  def test_bfloat16_inputs(self):
    self._interpret_only()
    self._check((2, 63, 40, 16), Cfg(block_t=4), dtype=jnp.bfloat16, seed=7)

  @pytest.mark.slow
  def test_wide_block_one_chunk(self):
    self._interpret_only()
    self._check((1, 10, 70, 16), Cfg(block_d=64, block_t=16, num_warps=2), seed=9)

  @pytest.mark.skipif(jax.default_backend() != "gpu", reason="default tiles are slow to "
                      "interpret: compiled only")
  @pytest.mark.parametrize("strong", [False, True])
  def test_default_config_medium(self, strong):
    self._check((2, 1000, 256, 16), strong=strong, seed=11)

  def test_op_dispatch_bf16(self):
    """seqmix.ops.ssm.selective_scan(impl="pallas") returns y in u's dtype, h_T float32."""
    inp, reset = _inputs(13, 2, 12, 8, 4, dtype=jnp.bfloat16)
    args = [inp[k] for k in NAMES[:6]]
    kw = dict(delta_bias=inp["delta_bias"], initial_state=inp["initial_state"],
              delta_softplus=True, reset=reset)
    y, h = selective_scan(*args, impl="pallas", **kw)
    with jax.default_matmul_precision("highest"):
      ry, rh = selective_scan(*args, impl="reference", **kw)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    assert_rel_close(y.astype(jnp.float32), ry.astype(jnp.float32), RTOL["bfloat16"], "y")
    assert_rel_close(h, rh, F32, "h_T")


class TestSelectiveScanPallasInterpret(TestSelectiveScanPallas):
  INTERPRET = True


@pytest.fixture
def fake_h100(monkeypatch):
  """Let the Triton lowering run without a GPU: it only asks the device for its capability."""
  from jax._src.pallas.triton import gpu_info, pallas_call_registration
  info = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: info)


@pytest.mark.parametrize("with_reset,cfg", [
    (True, None), pytest.param(False, None, marks=pytest.mark.slow),
    (True, Cfg(block_t=4, backward="v2", bwd_block_t=8)),
    pytest.param(True, Cfg(block_t=8, backward="v2", bwd_block_t=4), marks=pytest.mark.slow)])
def test_triton_lowering(fake_h100, with_reset, cfg):
  """Forward and backward (default config, and backward v2) lower to Triton IR."""
  b, t, d, n = 2, 64, 64, 16
  u = jnp.ones((b, t, d))
  reset = jnp.zeros((b, t), bool) if with_reset else None

  def loss(u, dl, a, bm, cm, dsk, bias, h0):
    y, ht = kernel_ops.selective_scan(u, dl, a, bm, cm, dsk, delta_bias=bias, delta_softplus=True,
                                      initial_state=h0, reset=reset, config=cfg)
    return y.sum() + ht.sum()

  args = (u, u, -jnp.ones((d, n)), jnp.ones((b, t, n)), jnp.ones((b, t, n)), jnp.ones(d),
          jnp.ones(d), jnp.ones((b, d, n)))
  text = jax.jit(jax.grad(loss, argnums=tuple(range(8)))).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2
