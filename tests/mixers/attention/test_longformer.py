"""Longformer (causal): dilated window + global tokens against a float64 masked-softmax loop,
decoding == parallel with packed documents (global tokens of each document), config errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.longformer import Longformer
from seqmix.testing import RTOL, assert_rel_close

from _sparse_oracle import sparse_attention


@pytest.mark.parametrize("w,d,g", [(3, 2, 2), (4, 1, 0)])
def test_matches_masked_softmax_and_decodes(w, d, g):
  mod = Longformer(d_model=32, num_heads=4, num_kv_heads=2, attention_window=w, dilation=d,
                   num_global=g)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(1, 2, 14)
  seg = jnp.asarray([[0] * 14, [0] * 4 + [1] * 10], jnp.int32)
  pos = jnp.asarray([list(range(14)), list(range(4)) + list(range(10))])
  rule = lambda h, i, j: (i - j < w * d and (i - j) % d == 0) or j < g
  y, _ = run(x, segment_ids=seg, positions=pos)
  assert_rel_close(y, sparse_attention(params, x, [rule], pos, seg), RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos), y, RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos, chunks=[5, 9]), y,
                   RTOL["float32"])


def test_keys_of_one_query():
  pos = jnp.arange(12)[None]
  m = np.asarray(Longformer(d_model=32, attention_window=3, dilation=2, num_global=2)
                 ._patterns(pos, pos)[0][0, 0])
  assert list(np.flatnonzero(m[11] & (np.arange(12) <= 11))) == [0, 1, 7, 9, 11]


@pytest.mark.parametrize("kw,match", [(dict(attention_window=0), "attention_window=0"),
                                      (dict(dilation=0), "dilation=0"),
                                      (dict(num_global=-1), "num_global=-1")])
def test_bad_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    Longformer(d_model=32, num_heads=4, **kw).init_cache(1, 4)
