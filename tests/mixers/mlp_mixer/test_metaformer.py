"""The causal MetaFormer pooling mixer against a float64 NumPy loop, for windows and the
cumulative mean (whose linear_scan the protocol suite does not reach with the registry's
window=3), packed documents, decoding across scan chunks, and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.mlp_mixer.metaformer import MetaFormerPool
from seqmix.testing import RTOL, assert_rel_close

D, T = 32, 11
SEG = np.array([[1] * 4 + [2] * 7, [0] * T], np.int32)


def _loop(x, gamma, window, seg):
  """y_t = γ (mean of x_s over s in (t − W, t], same document − x_t)."""
  y = np.zeros(x.shape)
  for i in range(x.shape[0]):
    for t in range(x.shape[1]):
      lo = 0 if window is None else max(0, t - window + 1)
      terms = [x[i, s] for s in range(lo, t + 1) if seg[i, s] == seg[i, t]]
      y[i, t] = gamma * (np.mean(terms, axis=0) - x[i, t])
  return y


# (window, packed): row 0 of a packed batch holds two documents, row 1 one.
@pytest.mark.parametrize("window, packed", [(3, False), (2, True), (5, True), (None, False),
                                            (None, True)])
def test_matches_formula(window, packed):
  module = MetaFormerPool(d_model=D, window=window, impl="reference")
  x, p64, _, params = mt.oracle_setup(module, t=T, b=2)
  gamma = np.random.default_rng(1).standard_normal(D)   # a scale of order 1, not 1e-5
  params = {"layer_scale": jnp.asarray(gamma, jnp.float32)}
  gamma = np.asarray(params["layer_scale"], np.float64)
  seg = SEG if packed else np.zeros_like(SEG)
  kw = dict(segment_ids=jnp.asarray(seg)) if packed else {}
  runner = mt.Runner(module, params)
  xs = jnp.asarray(x, jnp.float32)
  want = _loop(x, gamma, window, seg)
  assert_rel_close(runner(xs, **kw)[0], want, RTOL["float32"], "parallel vs loop")
  assert_rel_close(runner.decode(xs, **kw, chunks=[6, 5]), want, RTOL["float32"],
                   "prefill 6 + 5 vs loop")


def test_cumulative_form_passes_the_protocol_across_chunks():
  """window=None through the protocol checks, T = 13 over scan chunks of 4: the prefill split
  at 6 and the second document's start at 7 both fall inside a chunk."""
  module = MetaFormerPool(d_model=D, window=None, impl="chunked", chunk_size=4)
  params = mt.init_params(module)
  runner = mt.Runner(module, params)
  x = mt.random_inputs(6, 2, 13)
  mt.check_causal(module, params, mt.random_inputs(1, 2, 8))
  mt.check_split_prefill(runner, x, 6)
  mt.check_segments(runner, x, 7)


def test_layer_scale_init_and_config_errors():
  module = MetaFormerPool(d_model=D)
  params = jax.jit(module.init)(jax.random.key(0), mt.random_inputs(0, 1, 4))["params"]
  np.testing.assert_allclose(np.asarray(params["layer_scale"].unbox()), 1e-5)
  for bad in (1, 0):
    with pytest.raises(ValueError, match=rf"window={bad} must be >= 2"):
      MetaFormerPool(d_model=D, window=bad).init_cache(1, 4)
