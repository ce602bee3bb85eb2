"""CAPE (DAPE) against its float64 formula from the component's parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.positional import base

B, T, H, G, DH = 2, 5, 4, 2, 8


def _leaky(x):
  return np.where(x > 0, x, 0.01 * x)


@pytest.mark.parametrize("base_position", ["kerple_log", "none"])
def test_cape_matches_formula(base_position):
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((B, T, H, DH)), rng.standard_normal((B, T, G, DH))
  pos = 1000 + np.broadcast_to(np.arange(T), (B, T))
  comp = base.build("cape", num_heads=H, head_dim=DH,
                    kwargs={"base_position": base_position}, module_name=None)
  args = (jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), pos, pos)
  params = nn.meta.unbox(comp.init(jax.random.key(0), *args, method="bias"))
  params = jax.tree.map(lambda a: a + 0.2 * rng.standard_normal(a.shape).astype(np.float32),
                        params)
  got = np.asarray(comp.apply(params, *args, method="bias"), np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  kr = np.repeat(k, H // G, axis=2)
  a = np.einsum("bthd,bshd->bhts", q, kr) / np.sqrt(DH)
  if base_position == "kerple_log":
    r1 = np.maximum(p["base_bias"]["r1"], 1e-2)[:, None, None]
    r2 = np.maximum(p["base_bias"]["r2"], 1e-2)[:, None, None]
    d = np.abs(np.arange(T)[:, None] - np.arange(T)[None, :])
    bb = np.broadcast_to(-r1 * np.log(1 + r2 * d), a.shape)
  else:
    bb = np.zeros_like(a)
  feats = np.concatenate([a, bb], axis=1).transpose(0, 2, 3, 1)     # [b, t, s, 2h]
  hid = _leaky(feats @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"])
  f = (hid @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"]).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, bb + f, rtol=1e-5, atol=1e-5)


def test_bad_base_position():
  comp = base.build("cape", num_heads=H, head_dim=DH, kwargs={"base_position": "cope"},
                    module_name=None)
  z = jnp.zeros((1, 2, H, DH))
  with pytest.raises(ValueError, match="base_position='cope'"):
    comp.init(jax.random.key(0), z, z, jnp.zeros((1, 2)), jnp.zeros((1, 2)), method="bias")
