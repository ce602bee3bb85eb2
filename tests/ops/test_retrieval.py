"""seqmix.ops.retrieval: exact top-k vs NumPy argsort, kNN attention vs a float64 loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops import retrieval
from seqmix.testing import assert_rel_close

B, T, H, M, K, V = 2, 5, 3, 37, 6, 7


def _data(seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, H, K)).astype(np.float32)
  keys = rng.standard_normal((B, M, H, K)).astype(np.float32)
  values = rng.standard_normal((B, M, H, V)).astype(np.float32)
  valid = rng.random((B, T, M)) < 0.6
  valid[0, 0] = False              # one query sees nothing
  valid[1, 1, :3] = True
  valid[1, 1, 3:] = False          # one sees fewer entries than k
  return q, keys, values, valid


def _np_scores(q, keys, valid):
  s = np.einsum("bthk,bmhk->bthm", q.astype(np.float64), keys.astype(np.float64)) / np.sqrt(K)
  return np.where(valid[:, :, None, :], s, -np.inf)


@pytest.mark.parametrize("mask", ["none", "per_row", "per_query"])
def test_top_k_matches_argsort(mask):
  q, keys, _, valid = _data()
  kk = 8
  if mask == "none":
    v_arg, v_np = None, np.ones((B, T, M), bool)
  elif mask == "per_row":
    v_arg = valid[:, 2]
    v_np = np.broadcast_to(v_arg[:, None], (B, T, M))
  else:
    v_arg = v_np = valid
  s, idx = jax.jit(lambda *a: retrieval.top_k(*a, k=kk, valid=None if v_arg is None else
                                              jnp.asarray(v_arg)))(q, keys)
  want_s = _np_scores(q, keys, v_np)
  order = np.argsort(-want_s, axis=-1, kind="stable")[..., :kk]
  want_top = np.take_along_axis(want_s, order, -1)
  live = np.isfinite(want_top)
  np.testing.assert_array_equal(np.isfinite(np.asarray(s)), live)
  np.testing.assert_array_equal(np.asarray(idx)[live], order[live])
  np.testing.assert_allclose(np.asarray(s)[live], want_top[live], rtol=1e-5, atol=1e-6)


def test_approx_returns_true_scores_of_real_entries():
  q, keys, _, _ = _data(1)
  s, idx = retrieval.top_k(jnp.asarray(q), jnp.asarray(keys), k=4, impl="approx")
  want = _np_scores(q, keys, np.ones((B, T, M), bool))
  np.testing.assert_allclose(np.asarray(s), np.take_along_axis(want, np.asarray(idx), -1),
                             rtol=1e-5, atol=1e-6)
  assert np.all(np.diff(np.asarray(s), axis=-1) <= 0)


def _np_knn(q, keys, values, valid, kk):
  s = _np_scores(q, keys, valid)
  o = np.zeros((B, T, H, V))
  for b in range(B):
    for t in range(T):
      for h in range(H):
        order = [m for m in np.argsort(-s[b, t, h])[:kk] if np.isfinite(s[b, t, h, m])]
        if not order:
          continue
        w = np.exp(s[b, t, h, order] - s[b, t, h, order].max())
        o[b, t, h] = (w / w.sum()) @ values[b, order, h].astype(np.float64)
  return o


def test_knn_attention_matches_loop_and_has_finite_grads():
  q, keys, values, valid = _data(2)
  fn = jax.jit(lambda *a: retrieval.knn_attention(*a, k=5, valid=jnp.asarray(valid)))
  o, lse = fn(q, keys, values)
  assert_rel_close(o, _np_knn(q, keys, values, valid, 5), 1e-5, "knn_attention vs loop")
  assert np.all(np.asarray(o[0, 0]) == 0) and np.all(np.isneginf(np.asarray(lse[0, 0])))
  g = jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a)[0])), argnums=(0, 1, 2))(q, keys, values)
  for leaf in g:
    assert np.all(np.isfinite(np.asarray(leaf)))
  assert np.abs(np.asarray(g[0])).max() > 0 and np.abs(np.asarray(g[1])).max() > 0


@pytest.mark.parametrize("kk", [0, M + 1])
def test_bad_k_raises(kk):
  q, keys, _, _ = _data()
  with pytest.raises(ValueError, match=rf"k={kk} must be an int in \[1, M=37\]"):
    retrieval.top_k(q, keys, k=kk)


def test_bad_keys_shape_raises():
  q, keys, _, _ = _data()
  with pytest.raises(ValueError, match=r"keys must be \[B, M, H, K\]"):
    retrieval.top_k(q, keys[..., :2], k=3)
