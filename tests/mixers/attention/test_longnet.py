"""LongNet dilated attention (causal): the (segment, dilation) patterns merged by their
softmax denominators against a float64 loop (numerator and denominator summed over patterns,
no lse), decoding == parallel with packed documents, config errors."""

import jax.numpy as jnp
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.longnet import LongNet
from seqmix.testing import RTOL, assert_rel_close

from _sparse_oracle import sparse_attention


def _rule(w, r, offsets):
  def rule(h, i, j):
    s = h % r if offsets else 0
    return i // w == j // w and (i % w) % r == s and (j % w) % r == s
  return rule


@pytest.mark.parametrize("ws,rs,offsets", [((3, 8), (1, 2), True), ((4, 6, 16), (1, 3, 2),
                                                                     False)])
def test_matches_denominator_merge_and_decodes(ws, rs, offsets):
  mod = LongNet(d_model=32, num_heads=4, num_kv_heads=2, segment_lengths=ws,
                dilation_rates=rs, head_offsets=offsets)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(3, 2, 14)
  seg = jnp.asarray([[0] * 14, [0] * 5 + [1] * 9], jnp.int32)
  pos = jnp.asarray([list(range(14)), list(range(5)) + list(range(9))])
  rules = [_rule(w, r, offsets) for w, r in zip(ws, rs)]
  y, _ = run(x, segment_ids=seg, positions=pos)
  assert_rel_close(y, sparse_attention(params, x, rules, pos, seg), RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos), y, RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos, chunks=[6, 8]), y,
                   RTOL["float32"])


@pytest.mark.parametrize("kw,match", [
    (dict(segment_lengths=(4, 8), dilation_rates=(1,)), "one length"),
    (dict(segment_lengths=(0,), dilation_rates=(1,)), "segment_lengths=\\(0,\\)"),
    (dict(segment_lengths=(4, 8), dilation_rates=(2, 4)), "must contain 1")])
def test_bad_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    LongNet(d_model=32, num_heads=4, **kw).init_cache(1, 4)
