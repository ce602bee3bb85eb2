"""Self-Extend against a float64 loop over (query, key) pairs with the paper's position rule
(exact within the neighbour window, grouped beyond); decode == parallel; config errors. The
shared protocol tests (`tests/mixers/test_protocol.py -k self_extend`) cover the rest."""

import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.self_extend import SelfExtend
from seqmix.testing import RTOL, assert_rel_close

from _remapped_oracle import remapped_attention


def _rule(g, w):
  def pair(i, j):
    if i - j < w:
      return i, j
    return i // g + w - w // g, j // g
  return pair


@pytest.mark.parametrize("g,w,kv", [(3, 4, 2), (2, 1, 4), (1, 3, 1)])
def test_matches_pairwise_formula(g, w, kv):
  mod = SelfExtend(d_model=32, num_heads=4, num_kv_heads=kv, group_size=g, neighbor_window=w)
  params = mt.init_params(mod)
  x = mt.random_inputs(0, 2, 17)
  y, _ = mt.Runner(mod, params)(x)
  want = remapped_attention(params, x, _rule(g, w))
  assert_rel_close(y, want, RTOL["float32"])


def test_packed_documents_and_decode():
  mod = SelfExtend(d_model=32, num_heads=4, num_kv_heads=2, group_size=2, neighbor_window=3)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(1, 2, 14)
  seg = jnp.asarray([[0] * 6 + [1] * 8, [0] * 14], jnp.int32)
  pos = jnp.asarray([list(range(6)) + list(range(8)), list(range(14))], jnp.int32)
  y, _ = run(x, segment_ids=seg, positions=pos)
  assert_rel_close(y, remapped_attention(params, x, _rule(2, 3), pos, seg), RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos, chunks=[5] + [1] * 9), y,
                   RTOL["float32"])


def test_group_size_one_is_plain_rope_attention():
  from seqmix.mixers.attention.mha import MHA
  kw = dict(d_model=32, num_heads=4, num_kv_heads=2)
  params = mt.init_params(MHA(**kw))
  x = mt.random_inputs(2, 1, 12)
  y = mt.Runner(SelfExtend(**kw, group_size=1, neighbor_window=3), params)(x)[0]
  assert_rel_close(y, mt.Runner(MHA(**kw), params)(x)[0], RTOL["float32"])


@pytest.mark.parametrize("kw,match", [
    (dict(group_size=0), "group_size=0"), (dict(neighbor_window=0), "neighbor_window=0"),
    (dict(window=4), "window=4 is not supported"), (dict(position="alibi"), "must be 'rope'")])
def test_bad_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    SelfExtend(d_model=32, num_heads=4, **kw).init_cache(1, 4)
