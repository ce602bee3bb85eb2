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


def test_matches_formula():
  """The init (W near zero, b = 1), then the block on row 0 packing two documents (positions
  restarting) and row 1 one document. Unpacked inputs without segment ids, and decoding, are
  the protocol suite's (doc 2 alone == packed, decode == parallel); positions past max_len
  give NaN, not a clipped table entry."""
  module = GMLP(d_model=D, d_ffn=F, max_len=L)
  x, p64, _, params = mt.oracle_setup(module, t=T, b=2)   # W and b are not zero: as init
  w0 = np.asarray(params["spatial_kernel"])
  assert 0 < np.abs(w0).max() <= 1e-3 / L and np.all(w0 != 0)
  np.testing.assert_array_equal(np.asarray(params["spatial_bias"]), np.ones(L))
  # A token-mixing matrix of order 1/sqrt(T) (the init's is ~1e-4), so mixing errors show.
  w = np.random.default_rng(5).standard_normal((L, L)) * 0.3
  params["spatial_kernel"] = jnp.asarray(w, jnp.float32)
  p64["spatial_kernel"] = np.asarray(params["spatial_kernel"], np.float64)
  runner = mt.Runner(module, params)
  xs = jnp.asarray(x, jnp.float32)
  y, _ = runner(xs, segment_ids=jnp.asarray(SEG), positions=jnp.asarray(POS))
  assert_rel_close(y, _loop(x, p64, SEG, POS), RTOL["float32"], "gmlp vs loop")
  past = np.broadcast_to(np.arange(T) + L - 5, (2, T))      # tokens 5.. sit at positions >= L
  y = np.asarray(runner(xs, segment_ids=jnp.zeros((2, T), jnp.int32),
                        positions=jnp.asarray(past))[0])
  assert np.all(np.isfinite(y[:, :5])) and np.all(np.isnan(y[:, 5:]))


def test_config_errors():
  with pytest.raises(ValueError, match=r"sequence length T=9 .* max_len=8"):
    GMLP(d_model=D, d_ffn=F, max_len=8).init(jax.random.key(0), mt.random_inputs(0, 1, 9))
  with pytest.raises(ValueError, match=r"init_cache max_len=9 .* max_len=8"):
    GMLP(d_model=D, d_ffn=F, max_len=8).init_cache(1, 9)
  with pytest.raises(ValueError, match=r"d_ffn=7 must be an even number"):
    GMLP(d_model=D, d_ffn=7).init_cache(1, 4)
