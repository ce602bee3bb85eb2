"""Sparse Transformer: strided and fixed patterns against a float64 masked-softmax loop, the
pattern itself, decoding == parallel (token by token and in chunks, packed documents), config
errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.sparse_transformer import SparseTransformer
from seqmix.testing import RTOL, assert_rel_close

from _sparse_oracle import sparse_attention


def _rule(pattern, l, c):
  if pattern == "strided":
    return lambda h, i, j: i - j < l or (i - j) % l == 0
  return lambda h, i, j: j // l == i // l or j % l >= l - c


@pytest.mark.parametrize("pattern,l,c", [("strided", 3, 1), ("fixed", 4, 2)])
def test_matches_masked_softmax_and_decodes(pattern, l, c):
  mod = SparseTransformer(d_model=32, num_heads=4, num_kv_heads=2, pattern=pattern, stride=l,
                          num_summary=c)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(0, 2, 14)
  seg = jnp.asarray([[0] * 14, [0] * 5 + [1] * 9], jnp.int32)
  pos = jnp.asarray([list(range(14)), list(range(5)) + list(range(9))])
  y, _ = run(x, segment_ids=seg, positions=pos)
  assert_rel_close(y, sparse_attention(params, x, [_rule(pattern, l, c)], pos, seg),
                   RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos), y, RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos, chunks=[6, 1, 7]), y,
                   RTOL["float32"])


def test_pattern_is_sparse_and_causal_rule():
  """The mask of the strided rule at T = 9, l = 3 (written out by hand) and of fixed."""
  pos = jnp.arange(9)[None]
  m = np.asarray(SparseTransformer(d_model=32, stride=3)._patterns(pos, pos)[0][0, 0])
  i, j = 8, np.arange(9)
  assert list(np.flatnonzero(m[i] & (j <= i))) == [2, 5, 6, 7, 8]
  f = np.asarray(SparseTransformer(d_model=32, pattern="fixed", stride=4, num_summary=1)
                 ._patterns(pos, pos)[0][0, 0])
  assert list(np.flatnonzero(f[8] & (j <= 8))) == [3, 7, 8]


@pytest.mark.parametrize("kw,match", [(dict(pattern="axial"), "pattern='axial'"),
                                      (dict(stride=0), "stride=0"),
                                      (dict(pattern="fixed", stride=4, num_summary=5),
                                       "num_summary=5")])
def test_bad_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    SparseTransformer(d_model=32, num_heads=4, **kw).init_cache(1, 4)
