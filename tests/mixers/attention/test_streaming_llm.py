"""StreamingLLM: the parallel form (Λ mask, in-cache positions) against a float64 pairwise
loop; decoding with the bounded cache (S sinks + a ring of W) equals the parallel form far past
S + W, token by token, in long prefill chunks and across packed documents; config errors."""

import jax.numpy as jnp
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.streaming_llm import StreamingLLM
from seqmix.testing import RTOL, assert_rel_close

from _remapped_oracle import remapped_attention


def _rule(s, w):
  """The cache as the paper keeps it: sinks 0..s−1 + the last w tokens; positions in cache."""
  def pair(i, j):
    if i - j < w:
      return i, j                      # recent: distance i − j
    if j < s:
      return min(i, s + w - 1), j      # sink, once the cache is full: query at s + w − 1
    return None                        # evicted
  return pair


@pytest.mark.parametrize("s,w,kv", [(2, 4, 2), (0, 3, 4)])
def test_matches_pairwise_formula_and_decodes(s, w, kv):
  mod = StreamingLLM(d_model=32, num_heads=4, num_kv_heads=kv, num_sink_tokens=s,
                     recent_window=w)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(0, 2, 16)
  y, _ = run(x)
  assert_rel_close(y, remapped_attention(params, x, _rule(s, w)), RTOL["float32"])
  assert mod.init_cache(2, 16).k.shape[1] == s + w          # bounded, whatever max_len
  assert_rel_close(run.decode(x), y, RTOL["float32"])
  assert_rel_close(run.decode(x, chunks=[9, 1, 6]), y, RTOL["float32"])


def test_packed_documents_decode():
  """Doc 2 starts mid-stream (its sinks replace doc 1's sink slots); doc 3 is shorter than S."""
  mod = StreamingLLM(d_model=32, num_heads=4, num_kv_heads=2, num_sink_tokens=3,
                     recent_window=2)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(1, 2, 16)
  seg = jnp.asarray([[0] * 6 + [1] * 8 + [2] * 2, [0] * 16], jnp.int32)
  pos = jnp.asarray([list(range(6)) + list(range(8)) + list(range(2)), list(range(16))])
  y, _ = run(x, segment_ids=seg, positions=pos)
  assert_rel_close(y, remapped_attention(params, x, _rule(3, 2), pos, seg), RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos), y, RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos, chunks=[4, 11, 1]), y,
                   RTOL["float32"])


@pytest.mark.parametrize("kw,match", [(dict(num_sink_tokens=-1), "num_sink_tokens=-1"),
                                      (dict(recent_window=0), "recent_window=0")])
def test_bad_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    StreamingLLM(d_model=32, num_heads=4, **kw).init_cache(1, 4)
