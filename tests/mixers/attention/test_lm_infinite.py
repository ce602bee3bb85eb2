"""LM-Infinite: the parallel form (Λ mask + distance ceiling) against a float64 pairwise loop;
decoding with the bounded cache equals the parallel form far past n_global + W; config
errors."""

import jax.numpy as jnp
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.lm_infinite import LMInfinite
from seqmix.testing import RTOL, assert_rel_close

from _remapped_oracle import remapped_attention


def _rule(n_global, w, limit):
  def pair(i, j):
    if i - j < w:
      return i, j                      # local branch: exact distance
    if j < n_global:
      return min(limit, i), 0          # global branch: seen at the distance ceiling
    return None
  return pair


@pytest.mark.parametrize("g,w,limit,kv", [(2, 4, None, 2), (1, 3, 6, 4)])
def test_matches_pairwise_formula_and_decodes(g, w, limit, kv):
  mod = LMInfinite(d_model=32, num_heads=4, num_kv_heads=kv, num_global=g, local_window=w,
                   distance_limit=limit)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(0, 2, 16)
  y, _ = run(x)
  assert_rel_close(y, remapped_attention(params, x, _rule(g, w, limit or w)), RTOL["float32"])
  assert mod.init_cache(2, 16).k.shape[1] == g + w
  assert_rel_close(run.decode(x), y, RTOL["float32"])
  assert_rel_close(run.decode(x, chunks=[9, 1, 6]), y, RTOL["float32"])


def test_packed_documents_decode():
  mod = LMInfinite(d_model=32, num_heads=4, num_kv_heads=2, num_global=2, local_window=3)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(1, 2, 14)
  seg = jnp.asarray([[0] * 6 + [1] * 8, [0] * 14], jnp.int32)
  pos = jnp.asarray([list(range(6)) + list(range(8)), list(range(14))])
  y, _ = run(x, segment_ids=seg, positions=pos)
  assert_rel_close(y, remapped_attention(params, x, _rule(2, 3, 3), pos, seg), RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos, chunks=[4, 9, 1]), y,
                   RTOL["float32"])


@pytest.mark.parametrize("kw,match", [(dict(num_global=-1), "num_global=-1"),
                                      (dict(local_window=0), "local_window=0"),
                                      (dict(distance_limit=0), "distance_limit=0")])
def test_bad_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    LMInfinite(d_model=32, num_heads=4, **kw).init_cache(1, 4)
