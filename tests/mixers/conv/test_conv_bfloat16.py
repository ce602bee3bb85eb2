"""The convolution mixers in bfloat16 compute (float32 params): outputs within the bfloat16
tolerance of the float32 forward, and one bfloat16 decoding step after a prefill within it of the
bfloat16 parallel form (the decoding path's own roundings: against float32, Hyena's chain of
three bfloat16 products lands a single step at ~1.1e-2, just over the tolerance, as the
bfloat16 rounding of each stage, 2^-9 relative, compounds)."""

import jax
import jax.numpy as jnp
import pytest

from seqmix.mixers import testing as mt
from seqmix.testing import RTOL, assert_rel_close

NAMES = ("hyena", "tnn", "m2", "lightconv", "dynamicconv", "talk", "token_shift_gpt",
         "multiresconv")
_SAMPLE = ("hyena",)  # the rest under `slow` (a compile per mixer and dtype)


@pytest.mark.parametrize("name", [n if n in _SAMPLE else pytest.param(n, marks=pytest.mark.slow)
                                  for n in NAMES])
def test_bfloat16_close_to_float32(name):
  m32, m16 = mt.build(name), mt.build(name, dtype=jnp.bfloat16)
  x = mt.random_inputs(0, 2, 16)
  params = mt.init_params(m32, x)
  y32, _ = jax.jit(m32.apply)({"params": params}, x)
  y16, _ = jax.jit(m16.apply)({"params": params}, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  assert_rel_close(y16.astype(jnp.float32), y32, RTOL["bfloat16"], f"{name} bf16 vs f32")
  # One cached step after a 15-token prefill: the cache (float32 buffers) takes bf16 inputs.
  y16_par = y16.astype(jnp.float32)
  runner = mt.Runner(m16, params)
  cache = m16.init_cache(2, 16)
  _, cache = runner(x[:, :15].astype(jnp.bfloat16), cache=cache)
  y_step, _ = runner(x[:, 15:].astype(jnp.bfloat16), cache=cache)
  assert y_step.dtype == jnp.bfloat16
  assert_rel_close(y_step.astype(jnp.float32), y16_par[:, 15:], RTOL["bfloat16"],
                   f"{name} bf16 step vs bf16 parallel")
