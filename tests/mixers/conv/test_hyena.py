"""Hyena: the parallel output against a float64 NumPy oracle (explicit O(T²) convolution sums),
the filter length limit, the cached filter, config errors.

The protocol (causality, decode == parallel, split prefill, segments, gradients) is checked by
tests/mixers/test_protocol.py.
"""

import math

import jax
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.conv import hyena
from seqmix.testing import RTOL, assert_rel_close

TOL = RTOL["float32"]


def _filter64(p, taps, l_max, emb_dim, num_inner, channels, fast=0.3, slow=1.5, target=1e-2):
  """Hyena's implicit filter, written from the paper's code description in float64."""
  bands = (emb_dim - 1) // 2
  rows = []
  for s in range(taps):
    feats = [s / (l_max - 1)]
    freqs = [1e-4 + j * (bands - 1 - 1e-4) / max(bands - 1, 1) for j in range(bands)]
    feats += [math.cos(2 * math.pi * f * s / l_max) for f in freqs]
    feats += [-math.sin(2 * math.pi * f * s / l_max) for f in freqs]
    rows.append(feats)
  z = np.array(rows)
  h = np.sin(p["freq"] * (z @ p["w_in"] + p["b_in"]))
  for i in range(num_inner):
    h = np.sin(p["freq"] * (h @ p[f"w_{i}"] + p[f"b_{i}"]))
  h = h @ p["w_out"]
  lo, hi = math.log(target) / slow, math.log(target) / fast
  deltas = np.array([lo + c * (hi - lo) / (channels - 1) for c in range(channels)])
  t = np.arange(taps)[:, None] / (l_max - 1)
  return h * np.exp(-t * np.abs(deltas))


def _causal_sum(u, k):
  """y_t = Σ_{s<=t, s<L} k_s u_{t-s}: u [B, T, C], k [L, C], an explicit double loop."""
  b, t, c = u.shape
  y = np.zeros_like(u)
  for i in range(t):
    for s in range(min(i + 1, k.shape[0])):
      y[:, i] += k[s] * u[:, i - s]
  return y


def hyena_oracle(p, x, *, order, l_max, emb_dim=3, num_inner=2):
  d = x.shape[-1]
  proj = x @ p["in_proj"]["kernel"] + p["in_proj"]["bias"]
  proj = _causal_sum(proj, p["short_conv"]["kernel"]) + p["short_conv"]["bias"]
  parts = np.split(proj, order + 1, axis=-1)
  taps = min(x.shape[1], l_max)
  h = _filter64(p["filter"], taps, l_max, emb_dim, num_inner, (order - 1) * d)
  z = parts[order]
  for o, n in enumerate(range(order - 1, 0, -1)):
    z = z * parts[n]
    z = _causal_sum(z, h[:, o * d:(o + 1) * d]) + p["filter_bias"][o] * z
  return (z * parts[0]) @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]


@pytest.mark.parametrize("order,t,l_max", [
    (2, 12, 64),    # direct conv path (short T), filter longer than T
    (2, 40, 48),    # FFT path (T >= 32, 40 taps)
    pytest.param(3, 12, 64, marks=pytest.mark.slow),    # two long convs
    (2, 20, 8),     # T > l_max: the filter has l_max taps
])
def test_matches_direct_formula(order, t, l_max):
  m = mt.build("hyena", order=order, l_max=l_max)
  x, p64, y, _ = mt.oracle_setup(m, t=t)
  assert_rel_close(y, hyena_oracle(p64, x, order=order, l_max=l_max), TOL, "hyena vs oracle")


@pytest.mark.slow
def test_emb_dim_5_matches_direct_formula():
  m = mt.build("hyena", emb_dim=5, num_inner_mlps=1)
  x, p64, y, _ = mt.oracle_setup(m, t=10)
  want = hyena_oracle(p64, x, order=2, l_max=64, emb_dim=5, num_inner=1)
  assert_rel_close(y, want, TOL, "hyena emb_dim=5 vs oracle")


def test_decode_past_l_max_matches_parallel():
  """With T > l_max the cache is a sliding buffer of l_max - 1 inputs: decode == parallel."""
  m = mt.build("hyena", l_max=6)
  runner = mt.Runner(m, mt.init_params(m))
  mt.check_decode_matches_parallel(runner, mt.random_inputs(0, 2, 11))


def test_filter_is_generated_once_per_cache():
  """The prefill stores the filter; later steps use the cached one, not the parameters."""
  m = mt.build("hyena")
  params = mt.init_params(m)
  runner = mt.Runner(m, params)
  x = mt.random_inputs(0, 1, 6)
  _, cache = runner(x[:, :5], cache=runner.init_cache(1, 6))
  assert bool(cache.filt.ready)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = _filter64(p64["filter"], 64, 64, 3, 2, 32)
  assert_rel_close(cache.filt.kernel, want, TOL, "cached filter")
  changed = jax.tree.map(lambda a: a, params)
  changed["filter"] = jax.tree.map(lambda a: a * 3.0, params["filter"])
  y_cached, _ = runner(x[:, 5:], cache=cache, params=changed)
  y_same, _ = runner(x[:, 5:], cache=cache)
  np.testing.assert_array_equal(np.asarray(y_cached), np.asarray(y_same))


@pytest.mark.parametrize("kw,match", [
    ({"order": 1}, "order=1"),
    ({"emb_dim": 4}, "emb_dim=4 must be odd"),
    ({"emb_dim": 1}, "emb_dim=1"),
    ({"l_max": 1}, "l_max=1"),
    ({"fast_decay_pct": 2.0}, "fast_decay_pct"),
    ({"decay_target": 1.5}, "decay_target"),
])
def test_bad_config_raises(kw, match):
  m = mt.build("hyena", **kw)
  with pytest.raises(ValueError, match=match):
    m.init(jax.random.key(0), mt.random_inputs(0, 1, 4))
