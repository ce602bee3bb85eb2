"""TOVA against a plain float64 Python loop of the policy (a list of kept tokens; softmax of
the current query over them; drop the lowest head-averaged weight once more than k are
held); decoding in any chunking equals the parallel scan; the cache is bounded; errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.tova import TOVA
from seqmix.testing import RTOL, assert_rel_close

from _remapped_oracle import rope64


def _oracle(params, x, cap, seg=None):
  p = {k: np.asarray(v["kernel"], np.float64) for k, v in params.items()}
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  q = np.einsum("btd,dhk->bthk", x, p["q_proj"])
  k = np.einsum("btd,dgk->btgk", x, p["k_proj"])
  v = np.einsum("btd,dgk->btgk", x, p["v_proj"])
  h, g, dh = q.shape[2], k.shape[2], q.shape[3]
  seg = np.zeros((b, t), int) if seg is None else np.asarray(seg)
  o = np.zeros((b, t, h, dh))
  for bi in range(b):
    kept = []                                   # token indices in the cache
    for i in range(t):
      if kept and seg[bi, kept[0]] != seg[bi, i]:
        kept = []                               # a new document: the old one is never seen
      cand = kept + [i]
      pos = i - next(j for j in range(i + 1) if seg[bi, j] == seg[bi, i])  # restart per doc
      w = np.zeros((h, len(cand)))
      for hi in range(h):
        gi = hi // (h // g)
        qi = rope64(q[bi, i, hi], pos)
        lg = np.array([qi @ rope64(k[bi, j, gi], j - (i - pos)) / np.sqrt(dh) for j in cand])
        e = np.exp(lg - lg.max())
        w[hi] = e / e.sum()
        o[bi, i, hi] = w[hi] @ v[bi, cand, gi]
      if len(cand) > cap:
        cand.pop(int(np.argmin(w.mean(0))))
      kept = cand
  return np.einsum("bthk,hkd->btd", o, p["o_proj"])


@pytest.mark.parametrize("cap,kv", [(3, 2), (1, 4), (6, 1)])
def test_matches_policy_loop_and_decodes(cap, kv):
  mod = TOVA(d_model=32, num_heads=4, num_kv_heads=kv, cache_size=cap)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(0, 2, 14)
  y, _ = run(x)
  assert_rel_close(y, _oracle(params, x, cap), RTOL["float32"])
  assert mod.init_cache(2, 14).k.shape[1] == cap
  assert_rel_close(run.decode(x, chunks=[5] + [1] * 9), y, RTOL["float32"])


def test_packed_documents():
  mod = TOVA(d_model=32, num_heads=4, num_kv_heads=2, cache_size=3)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(1, 2, 14)
  seg = jnp.asarray([[0] * 6 + [1] * 8, [0] * 14], jnp.int32)
  pos = jnp.asarray([list(range(6)) + list(range(8)), list(range(14))], jnp.int32)
  y, _ = run(x, segment_ids=seg, positions=pos)
  assert_rel_close(y, _oracle(params, x, 3, seg), RTOL["float32"])
  assert_rel_close(run.decode(x, segment_ids=seg, positions=pos), y, RTOL["float32"])


@pytest.mark.parametrize("kw,match", [(dict(cache_size=0), "cache_size=0"),
                                      (dict(position="alibi"), "'rope' or 'none'"),
                                      (dict(window=3), "window=3")])
def test_bad_configs(kw, match):
  with pytest.raises(ValueError, match=match):
    TOVA(d_model=32, num_heads=4, **kw).init_cache(1, 4)
