"""infini_attention against a float64 plain loop over tokens and segments (memory committed
when the next segment starts), plus decoding across segment boundaries and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.models import segment_recurrent as sr
from seqmix.testing import assert_rel_close


def _rope(x, p, base=10000.0):
  d = x.shape[-1]
  ang = p * base ** (-np.arange(0, d, 2) / d)
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)],
                        -1)


def _oracle(x, p, positions, seg, seg_len, eps, use_rope=True):
  b, t, d = x.shape
  wq, wk, wv = (p[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj"))
  wo, beta = p["o_proj"]["kernel"], p["beta"]
  h, dh = wq.shape[1:]
  sigma = lambda z: np.where(z > 0, z + 1.0, np.exp(z))       # ELU + 1
  gate = 1.0 / (1.0 + np.exp(-beta))
  y = np.zeros((b, t, d))
  for bi in range(b):
    q = np.einsum("td,dhe->the", x[bi], wq)
    k = np.einsum("td,dhe->the", x[bi], wk)
    v = np.einsum("td,dhe->the", x[bi], wv)
    mem, z, current = np.zeros((h, dh, dh)), np.zeros((h, dh)), []
    for i in range(t):
      if i == 0 or seg[bi, i] != seg[bi, i - 1]:
        mem, z, current = np.zeros((h, dh, dh)), np.zeros((h, dh)), []
      elif positions[bi, i] // seg_len != positions[bi, i - 1] // seg_len:
        for j in current:                                       # the segment has ended
          mem += np.einsum("hk,hv->hkv", sigma(k[j]), v[j])
          z += sigma(k[j])
        current = []
      current.append(i)
      sq = sigma(q[i])
      a_mem = np.einsum("hk,hkv->hv", sq, mem) / (np.sum(sq * z, -1, keepdims=True) + eps)
      qi = _rope(q[i], positions[bi, i]) if use_rope else q[i]
      kj = np.stack([_rope(k[j], positions[bi, j]) if use_rope else k[j] for j in current])
      logits = np.einsum("he,jhe->hj", qi, kj) / np.sqrt(dh)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      a_dot = np.einsum("hj,jhe->he", w, v[current])
      o = gate[:, None] * a_mem + (1 - gate[:, None]) * a_dot
      y[bi, i] = np.einsum("he,hed->d", o, wo)
  return y


@pytest.mark.parametrize("seg_len, packed, position", [(4, False, "rope"), (3, True, "rope"),
                                                       (5, True, "none"), (1, False, "rope")])
def test_matches_direct_formula(seg_len, packed, position):
  module = mt.build("infini_attention", segment_len=seg_len, position=position)
  t = 14
  x = mt.random_inputs(0, 2, t)
  if packed:
    seg, pos = mt.packed_pair(x, 6)
  else:
    seg = jnp.zeros((2, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  params = mt.init_params(module, x)
  params["beta"] = jnp.asarray([-0.5, 0.7])           # both branches weigh in, differently
  y = jax.jit(module.apply)({"params": params}, x, segment_ids=seg if packed else None,
                            positions=pos if packed else None)[0]
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = _oracle(np.asarray(x, np.float64), p64, np.asarray(pos), np.asarray(seg), seg_len,
                 module.eps, use_rope=position == "rope")
  assert_rel_close(y, want, 1e-5, "infini_attention vs direct formula")


def test_memory_carries_earlier_segments():
  """Segment 3's outputs depend on segment 1 only through the memory (the local attention
  stays within segments): with gate sigmoid(β) -> 0 they do not."""
  module = mt.build("infini_attention", segment_len=4)
  x = mt.random_inputs(1, 2, 12)
  params = mt.init_params(module, x)
  fwd = jax.jit(lambda p, x_: module.apply({"params": p}, x_)[0])
  x2 = x.at[:, :4].add(1.0)
  assert np.abs(np.asarray(fwd(params, x) - fwd(params, x2))[:, 8:]).max() > 1e-4
  closed = {**params, "beta": jnp.full((2,), -1e4)}
  np.testing.assert_allclose(np.asarray(fwd(closed, x))[:, 8:], np.asarray(fwd(closed, x2))[:, 8:],
                             rtol=0, atol=1e-6)


@pytest.mark.slow
def test_decode_across_segment_boundaries_and_segment_runs():
  """Chunks that end mid-segment, at a boundary and span several segments, and the
  segment-recurrent wrapper, all equal the parallel form."""
  module = mt.build("infini_attention", segment_len=4)
  x = mt.random_inputs(2, 2, 16)
  params = mt.init_params(module, x)
  runner = mt.Runner(module, params)
  y = runner(x)[0]
  assert_rel_close(runner.decode(x, chunks=[3, 5, 1, 7]), y, 1e-5, "chunks 3+5+1+7")
  assert_rel_close(runner.decode(x, chunks=[4, 8, 4]), y, 1e-5, "chunks 4+8+4")
  y_seg = jax.jit(lambda p: sr.run_segments(module, {"params": p}, x, segment_len=4)[0])(params)
  assert_rel_close(y_seg, y, 1e-5, "segment_recurrent vs parallel")


@pytest.mark.parametrize("field, value, err, match", [
    ("segment_len", 0, ValueError, "segment_len=0 must be a positive int"),
    ("update", "hebbian", ValueError, "update='hebbian' is not one of"),
    ("update", "delta", NotImplementedError, "update='linear' is"),
    ("position", "alibi", ValueError, "position='alibi' is not one of"),
    ("eps", 0.0, ValueError, "eps=0.0 must be > 0"),
])
def test_bad_config_raises(field, value, err, match):
  module = mt.build("infini_attention", **{field: value})
  with pytest.raises(err, match=match):
    module.init(jax.random.key(0), mt.random_inputs(0, 1, 4))
