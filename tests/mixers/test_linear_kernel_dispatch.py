"""gla (no, fixed and scalar gates) and the ungated delta rule reach their Pallas kernels through
`impl="auto"` on GPU; per-key gates, rwkv6 and the gated delta rule stay chunked.

The GPU is simulated as in test_scan_kernel_dispatch.py: `seqmix.ops._impl.platform` reports
"gpu", the kernels decide interpret mode from the real backend ("cpu"), so the kernel bodies
run in the Pallas interpreter. A mixer at its default config must call the kernel entry and
give the output and parameter gradients of its CPU (chunked) path.
"""

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.delta_rule import ops as delta_kernel
from kernels_pallas.gla import ops as gla_kernel
from seqmix.mixers import testing as mt
from seqmix.ops import _impl
from seqmix.ops import delta_rule, linear_attention
from seqmix.testing import RTOL, assert_trees_rel_close


@pytest.mark.parametrize("shape,want", [(None, "pallas"), ((4,), "pallas"), ((2, 7, 4), "pallas"),
                                        ((2, 7, 4, 8), "chunked")])
def test_gla_auto_by_gate_form(monkeypatch, shape, want):
  monkeypatch.setattr(_impl, "platform", lambda: "gpu")
  g = None if shape is None else jnp.zeros(shape)
  assert _impl.resolve("gla", "auto", linear_attention._AVAILABLE,
                       linear_attention.gla_auto(g)) == want
  monkeypatch.setattr(_impl, "platform", lambda: "cpu")
  assert _impl.resolve("gla", "auto", linear_attention._AVAILABLE,
                       linear_attention.gla_auto(g)) == "chunked"


def test_auto_log_line_quotes_the_measurement(monkeypatch, caplog):
  monkeypatch.setattr(_impl, "platform", lambda: "gpu")
  monkeypatch.setattr(_impl, "_LOGGED", set())
  with caplog.at_level("INFO", logger="seqmix.ops"):
    _impl.resolve("delta_rule", "auto", delta_rule._AVAILABLE, delta_rule._AUTO_UNGATED)
  assert "'pallas' on gpu" in caplog.text and "H200 2026-12-04" in caplog.text


def _run(module, params, x):
  def loss(p):
    y, _ = module.apply({"params": p}, x)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return y, grads


# Interpreting a kernel inside a mixer's forward and backward takes 20-60 s on 2 shared cores:
# the default suite runs retnet (fixed [H] gate) only.
CASES = [pytest.param("retnet", gla_kernel, "gla", id="retnet"),
         pytest.param("deltanet", delta_kernel, "delta_rule", id="deltanet",
                      marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,kernel_module,entry", CASES)
def test_auto_on_gpu_reaches_kernel(monkeypatch, name, kernel_module, entry):
  module = mt.build(name)
  assert module.impl == "auto", f"{name}: default impl is {module.impl!r}, not 'auto'"
  x = mt.random_inputs(0, 2, 7, module.d_model)
  params = mt.init_params(module, x)
  jax.clear_caches()
  want = _run(module, params, x)
  calls = []
  original = getattr(kernel_module, entry)

  def spy(*args, **kwargs):
    calls.append(kwargs.get("interpret"))
    return original(*args, **kwargs)

  monkeypatch.setattr(kernel_module, entry, spy)
  monkeypatch.setattr(_impl, "platform", lambda: "gpu")
  jax.clear_caches()
  try:
    got = _run(module, params, x)
  finally:
    jax.clear_caches()
  assert calls, f"{name}: impl='auto' on GPU did not reach the {entry} kernel"
  # The mixers compute in float32: float32 tolerance.
  assert_trees_rel_close(got, want, RTOL["float32"], f"{name} (y, param grads)")
