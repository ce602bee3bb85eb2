"""Dual Chunk Attention against a float64 loop over (query, key) pairs with the intra /
successive / inter position rule; decode == parallel; config errors. The shared protocol
tests (`tests/mixers/test_protocol.py -k dca`) cover the rest."""

import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.dca import DCA
from seqmix.testing import RTOL, assert_rel_close

from _remapped_oracle import remapped_attention


def _rule(s, w):
  def pair(i, j):
    ci, cj = i // s, j // s
    if ci == cj:
      qp = i % s
    elif ci == cj + 1:
      qp = s + min(i % s, w)
    else:
      qp = s + w
    return qp, j % s
  return pair


def test_rule_never_exceeds_chunk_plus_window():
  """The point of DCA: every relative distance stays within [0, s + w]."""
  s, w, pair = 5, 2, _rule(5, 2)
  dists = [pair(i, j)[0] - pair(i, j)[1] for i in range(40) for j in range(i + 1)]
  assert min(dists) >= 0 and max(dists) == s + w


@pytest.mark.parametrize("s,w,kv", [(4, 2, 2), (3, 0, 4), (5, 4, 1)])
def test_matches_pairwise_formula(s, w, kv):
  mod = DCA(d_model=32, num_heads=4, num_kv_heads=kv, chunk_len=s, local_window=w)
  params = mt.init_params(mod)
  x = mt.random_inputs(0, 2, 17)
  y, _ = mt.Runner(mod, params)(x)
  assert_rel_close(y, remapped_attention(params, x, _rule(s, w)), RTOL["float32"])


def test_packed_documents_and_decode():
  mod = DCA(d_model=32, num_heads=4, num_kv_heads=2, chunk_len=3, local_window=1)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(1, 2, 14)
  seg = jnp.asarray([[0] * 6 + [1] * 8, [0] * 14], jnp.int32)
  pos = jnp.asarray([list(range(6)) + list(range(8)), list(range(14))], jnp.int32)
  y, _ = run(x, segment_ids=seg, positions=pos)
  assert_rel_close(y, remapped_attention(params, x, _rule(3, 1), pos, seg), RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos, chunks=[5] + [1] * 9), y,
                   RTOL["float32"])


@pytest.mark.parametrize("kw,match", [
    (dict(chunk_len=0), "chunk_len=0"), (dict(chunk_len=4, local_window=4), "local_window=4"),
    (dict(local_window=-1), "local_window=-1"), (dict(window=3), "window=3 is not supported")])
def test_bad_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    DCA(d_model=32, num_heads=4, **kw).init_cache(1, 4)
