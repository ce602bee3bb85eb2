"""BiPE: intra-segment positions from a separator, segment indices (also continued from a
cache), the inter-segment ALiBi bias; mha with BiPE decodes equal to its parallel form with
segment resets inside the stream."""

import jax.numpy as jnp
import numpy as np

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.mha import MHA, MHACache
from seqmix.positional import base, bipe
from seqmix.testing import RTOL, assert_rel_close

SEP = 9
TOKENS = np.array([[1, 2, SEP, 3, SEP, SEP, 4, 5, 6, SEP, 7, 1],
                   [SEP, 1, 2, 3, 4, 5, 6, 7, 8, 2, SEP, 3]])


def _plain(tokens):
  pos, seg, p, s = [], [], 0, 0
  for t, tok in enumerate(tokens):
    if t and tokens[t - 1] == SEP:
      p, s = 0, s + 1
    pos.append(p)
    seg.append(s)
    p += 1
  return pos, seg


def test_positions_and_segment_indices():
  pos = np.asarray(bipe.bipe_positions(TOKENS, SEP))
  comp = base.build("bipe", num_heads=4, head_dim=8, module_name=None)
  seg = np.asarray(comp.bias_positions(jnp.asarray(pos)))
  for b in range(2):
    want_pos, want_seg = _plain(TOKENS[b].tolist())
    np.testing.assert_array_equal(pos[b], want_pos)
    np.testing.assert_array_equal(seg[b], want_seg)
  # Continued from a cache holding tokens 0..5 (slots 6.. empty): the same indices.
  cache = MHACache(k=None, v=None, idx=jnp.asarray(np.where(np.arange(8) < 6, np.arange(8), -1)
                                                   [None].repeat(2, 0)),
                   pos=jnp.asarray(np.pad(seg[:, :6], ((0, 0), (0, 2)))), seg=None, length=None)
  np.testing.assert_array_equal(comp.bias_positions(jnp.asarray(pos[:, 6:]), cache), seg[:, 6:])


def test_bias_is_alibi_on_segment_index():
  comp = base.build("bipe", num_heads=4, head_dim=8, module_name=None)
  s = np.array([[0, 0, 1, 3]])
  got = np.asarray(comp.apply({}, None, None, s, s, method="bias"))
  for h in range(4):
    want = -(2.0 ** (-8.0 * (h + 1) / 4)) * np.abs(s[0][:, None] - s[0][None, :])
    np.testing.assert_allclose(got[0, h], want, rtol=1e-6)


def test_mha_decode_with_segment_resets_equals_parallel():
  mod = MHA(d_model=mt.D_MODEL, num_heads=4, num_kv_heads=2, position="bipe")
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(0, 2, TOKENS.shape[1])
  pos = bipe.bipe_positions(TOKENS, SEP)
  y, _ = run(x, positions=pos)
  assert_rel_close(run.decode(x, positions=pos), y, RTOL["float32"], "bipe decode")
  assert_rel_close(run.decode(x, positions=pos, chunks=[5, 7]), y, RTOL["float32"], "prefill")
