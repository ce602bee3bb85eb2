"""Causal gMLP against a float64 NumPy loop of the paper's block, its init, packed documents,
decoding and config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.mlp_mixer.gmlp import GMLP
from seqmix.testing import RTOL, assert_rel_close

D, T, F, L = 32, 11, 24, 16
SEG = np.array([[1] * 4 + [2] * 7, [0] * T], np.int32)
POS = np.array([list(range(4)) + list(range(7)), list(range(T))], np.int32)


def _gelu(x):   # tanh approximation, as flax's nn.gelu default
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _loop(x, p, seg, pos):
  z = _gelu(x @ p["proj_in"]["kernel"] + p["proj_in"]["bias"])
  z1, z2 = z[..., : F // 2], z[..., F // 2:]
  mu = z2.mean(-1, keepdims=True)
  var = ((z2 - mu) ** 2).mean(-1, keepdims=True)
  z2 = (z2 - mu) / np.sqrt(var + 1e-5) * p["sgu_norm"]["scale"] + p["sgu_norm"]["bias"]
  w, bias = p["spatial_kernel"], p["spatial_bias"]
  g = np.zeros(z2.shape)
  for i in range(x.shape[0]):
    for t in range(x.shape[1]):
      g[i, t] = bias[pos[i, t]]
      for s in range(t + 1):
        if seg[i, s] == seg[i, t]:
          g[i, t] += w[pos[i, t], pos[i, s]] * z2[i, s]
  return (z1 * g) @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]


@pytest.mark.parametrize("packed", [False, True])
def test_matches_formula(packed):
  module = GMLP(d_model=D, d_ffn=F, max_len=L)
  x, p64, _, params = mt.oracle_setup(module, t=T, b=2)
  # A token-mixing matrix of order 1/sqrt(T) (the init's is ~1e-4), so mixing errors show.
  w = np.random.default_rng(5).standard_normal((L, L)) * 0.3
  params["spatial_kernel"] = jnp.asarray(w, jnp.float32)
  p64["spatial_kernel"] = np.asarray(params["spatial_kernel"], np.float64)
  seg = SEG if packed else np.zeros_like(SEG)
  pos = POS if packed else np.broadcast_to(np.arange(T), SEG.shape)
  kw = dict(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos)) if packed else {}
  runner = mt.Runner(module, params)
  xs = jnp.asarray(x, jnp.float32)
  want = _loop(x, p64, seg, pos)
  assert_rel_close(runner(xs, **kw)[0], want, RTOL["float32"], "gmlp parallel vs loop")
  assert_rel_close(runner.decode(xs, **kw, max_len=L), want, RTOL["float32"],
                   "gmlp decode vs loop")


def test_init_is_near_zero_mixing_with_unit_bias():
  module = GMLP(d_model=D, d_ffn=F, max_len=L)
  params = jax.jit(module.init)(jax.random.key(0), mt.random_inputs(0, 1, 4))["params"]
  w = np.asarray(params["spatial_kernel"].unbox())
  assert 0 < np.abs(w).max() <= 1e-3 / L
  np.testing.assert_array_equal(np.asarray(params["spatial_bias"].unbox()), np.ones(L))


def test_config_errors():
  with pytest.raises(ValueError, match=r"sequence length T=9 .* max_len=8"):
    GMLP(d_model=D, d_ffn=F, max_len=8).init(jax.random.key(0), mt.random_inputs(0, 1, 9))
  with pytest.raises(ValueError, match=r"init_cache max_len=9 .* max_len=8"):
    GMLP(d_model=D, d_ffn=F, max_len=8).init_cache(1, 9)
  with pytest.raises(ValueError, match=r"d_ffn=7 must be an even number"):
    GMLP(d_model=D, d_ffn=7).init_cache(1, 4)


def test_positions_past_max_len_are_nan():
  module = GMLP(d_model=D, d_ffn=F, max_len=8)
  x = mt.random_inputs(0, 1, 4)
  params = mt.init_params(module, x)
  y = np.asarray(module.apply({"params": params}, x, positions=jnp.asarray([[5, 6, 7, 8]]))[0])
  assert np.all(np.isfinite(y[:, :3])) and np.all(np.isnan(y[:, 3]))
