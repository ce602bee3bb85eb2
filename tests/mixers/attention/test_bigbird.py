"""BigBird (causal): window + global + random blocks against a float64 masked-softmax loop
(given the seeded block table), decoding == parallel with packed documents, the random
structure (seeded, causal, reproducible), config errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.bigbird import BigBird, random_blocks
from seqmix.testing import RTOL, assert_rel_close

from _sparse_oracle import sparse_attention


def test_random_blocks_seeded_and_causal():
  beta = jnp.arange(64)
  a = np.asarray(random_blocks(3, 2, beta))
  assert a.shape == (64, 2)
  assert np.all(a[0] == -1)
  assert np.all((a[1:] >= 0) & (a[1:] < np.arange(1, 64)[:, None]))   # strictly earlier
  assert np.array_equal(a, np.asarray(random_blocks(3, 2, beta)))      # same seed, same
  assert not np.array_equal(a, np.asarray(random_blocks(4, 2, beta)))  # another seed differs
  assert len(np.unique(a[32:, 0])) > 8                                  # not a constant


def test_pattern_is_causal_and_seeded():
  """Masked by causality or not, the pattern never reaches a key after the query's block; the
  mask is a function of the seed."""
  pos = jnp.arange(40)[None]
  mod = BigBird(d_model=32, attention_window=2, num_global=1, block_size=4, num_random=2,
                seed=7)
  m = np.asarray(mod._patterns(pos, pos)[0][0, 0])
  i, j = np.arange(40)[:, None], np.arange(40)[None]
  rand = m & ~((i - j < 2) | (j < 1))
  assert rand.any() and not np.any(rand & (j // 4 >= i // 4))
  assert np.array_equal(m, np.asarray(mod._patterns(pos, pos)[0][0, 0]))
  other = BigBird(d_model=32, attention_window=2, num_global=1, block_size=4, num_random=2,
                  seed=8)
  assert not np.array_equal(m, np.asarray(other._patterns(pos, pos)[0][0, 0]))


def test_matches_masked_softmax_and_decodes():
  w, g, bs, r, seed = 2, 1, 2, 2, 5
  mod = BigBird(d_model=32, num_heads=4, num_kv_heads=2, attention_window=w, num_global=g,
                block_size=bs, num_random=r, seed=seed)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(2, 2, 16)
  seg = jnp.asarray([[0] * 16, [0] * 5 + [1] * 11], jnp.int32)
  pos = jnp.asarray([list(range(16)), list(range(5)) + list(range(11))])
  table = np.asarray(random_blocks(seed, r, jnp.arange(16)))
  rule = lambda h, i, j: i - j < w or j < g or (j // bs) in set(table[i // bs])
  y, _ = run(x, segment_ids=seg, positions=pos)
  assert_rel_close(y, sparse_attention(params, x, [rule], pos, seg), RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos), y, RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos, chunks=[7, 9]), y,
                   RTOL["float32"])


@pytest.mark.parametrize("kw,match", [(dict(attention_window=0), "attention_window=0"),
                                      (dict(block_size=0), "block_size=0"),
                                      (dict(num_random=-1), "num_random=-1"),
                                      (dict(num_global=-2), "num_global=-2")])
def test_bad_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    BigBird(d_model=32, num_heads=4, **kw).init_cache(1, 4)
