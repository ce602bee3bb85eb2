"""The scan mixers reach the Pallas kernels through `impl="auto"` once `auto` picks them on GPU.

On this CPU machine the GPU is simulated: `seqmix.ops._impl.platform` (what `auto` resolves
against) reports "gpu" and the op's GPU `auto` entry is set to "pallas" for the test only (as
the lead's switch will do for `linear_scan`; `selective_scan`'s already is). The ops decide
interpret mode from their own `platform` name (still "cpu"), so the kernel body runs in the
Pallas interpreter. Each mixer at its default config (impl="auto") must call the kernel entry
and give the output and the parameter gradients of its CPU path.
"""

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.linear_scan import ops as ls_kernel
from kernels_pallas.selective_scan import ops as ss_kernel
from seqmix.mixers import testing as mt
from seqmix.ops import _impl
from seqmix.ops import scan, ssm
from seqmix.testing import RTOL, assert_trees_rel_close

# hawk's RG-LRU is real, lru and s5 scan complex states, mingru a real gate.
# Interpreting the kernels inside a whole mixer's forward and backward costs 20-60 s per mixer
# on 2 shared cores, so the default suite runs mingru only.
SLOW = pytest.mark.slow
CASES = [pytest.param("mingru", scan, ls_kernel, "linear_scan", id="mingru"),
         pytest.param("hawk", scan, ls_kernel, "linear_scan", id="hawk", marks=SLOW),
         pytest.param("lru", scan, ls_kernel, "linear_scan", id="lru", marks=SLOW),
         pytest.param("s5", scan, ls_kernel, "linear_scan", id="s5", marks=SLOW),
         pytest.param("mamba", ssm, ss_kernel, "selective_scan", id="mamba", marks=SLOW)]


def _run(module, params, x):
  def loss(p):
    y, _ = module.apply({"params": p}, x)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape))), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return y, grads


@pytest.mark.parametrize("name,op_module,kernel_module,entry", CASES)
def test_auto_on_gpu_reaches_kernel(monkeypatch, name, op_module, kernel_module, entry):
  module = mt.build(name)
  assert module.impl == "auto", f"{name}: default impl is {module.impl!r}, not 'auto'"
  x = mt.random_inputs(0, 2, 7, module.d_model)
  params = mt.init_params(module, x)
  jax.clear_caches()  # the ops are jitted with impl static: drop traces resolved for "cpu"
  want = _run(module, params, x)

  calls = []
  original = getattr(kernel_module, entry)

  def spy(*args, **kwargs):
    calls.append(kwargs.get("interpret"))
    return original(*args, **kwargs)

  monkeypatch.setattr(kernel_module, entry, spy)
  monkeypatch.setattr(_impl, "platform", lambda: "gpu")
  monkeypatch.setitem(op_module.AUTO, "gpu", "pallas")
  jax.clear_caches()
  try:
    got = _run(module, params, x)
  finally:
    jax.clear_caches()  # later tests must not reuse traces made under the fake platform
  assert calls, f"{name}: impl='auto' on GPU did not reach the {entry} kernel"
  assert all(calls), f"{name}: the kernel ran compiled on a CPU ({calls=})"
  # Both paths compute in float32 (the mixers' default dtype): float32 tolerance.
  assert_trees_rel_close(got, want, RTOL["float32"], f"{name} (y, param grads)")
