"""memorizing against a float64 loop over queries: local softmax within the segment, exact
top-k over the memory of earlier tokens (NumPy argsort), per-head gate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.testing import assert_rel_close


def _rope(x, p, base=10000.0):
  d = x.shape[-1]
  ang = p * base ** (-np.arange(0, d, 2) / d)
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)],
                        -1)


def _softmax_avg(logits, vals):
  w = np.exp(logits - logits.max())
  return (w / w.sum()) @ vals


def _oracle(x, p, positions, seg, seg_len, mem_size, top_k, c):
  b, t, d = x.shape
  wq, wk, wv = (p[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj"))
  wo, gate = p["o_proj"]["kernel"], 1 / (1 + np.exp(-p["gate"]))
  h, dh = wq.shape[1:]
  y = np.zeros((b, t, d))
  for bi in range(b):
    q = np.einsum("td,dhe->the", x[bi], wq)
    k = np.einsum("td,dhe->the", x[bi], wk)
    v = np.einsum("td,dhe->the", x[bi], wv)
    ps, ss = positions[bi], seg[bi]
    for i in range(t):
      first = ps[i] // seg_len * seg_len
      loc = [j for j in range(i + 1) if ss[j] == ss[i] and i - j <= seg_len - 1 + c
             and ps[j] >= first - c]
      mem = [j for j in range(i + 1) if ss[j] == ss[i] and i - j <= seg_len - 1 + c + mem_size
             and first - c - mem_size <= ps[j] < first - c]
      o = np.zeros((h, dh))
      for hh in range(h):
        qr = _rope(q[i, hh], ps[i])
        a_loc = _softmax_avg(np.array([qr @ _rope(k[j, hh], ps[j]) for j in loc]) / np.sqrt(dh),
                             v[loc, hh])
        a_mem = np.zeros(dh)
        if mem:
          sc = np.array([q[i, hh] @ k[j, hh] for j in mem]) / np.sqrt(dh)
          top = np.argsort(-sc)[:top_k]
          a_mem = _softmax_avg(sc[top], v[np.asarray(mem)[top], hh])
        o[hh] = gate[hh] * a_mem + (1 - gate[hh]) * a_loc
      y[bi, i] = np.einsum("he,hed->d", o, wo)
  return y


@pytest.mark.parametrize("seg_len, mem_size, top_k, packed, xl", [
    (4, 6, 3, False, False), (3, 5, 2, True, True), (3, 3, 3, True, False), (2, 4, 2, False, True)])
def test_matches_direct_formula(seg_len, mem_size, top_k, packed, xl):
  module = mt.build("memorizing", segment_len=seg_len, memory_size=mem_size, top_k=top_k,
                    xl_cache=xl)
  t = 14
  x = mt.random_inputs(0, 2, t)
  if packed:
    seg, pos = mt.packed_pair(x, 5)
  else:
    seg = jnp.zeros((2, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  params = mt.init_params(module, x)
  params["gate"] = jnp.asarray([-0.4, 0.8])
  y = jax.jit(module.apply)({"params": params}, x, segment_ids=seg if packed else None,
                            positions=pos if packed else None)[0]
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = _oracle(np.asarray(x, np.float64), p64, np.asarray(pos), np.asarray(seg), seg_len,
                 mem_size, top_k, seg_len if xl else 0)
  assert_rel_close(y, want, 1e-5, "memorizing vs direct formula")


def test_memory_is_stop_gradient():
  module = mt.build("memorizing", segment_len=4, memory_size=4, top_k=2, xl_cache=False)
  x = mt.random_inputs(1, 2, 8)
  params = mt.init_params(module, x)
  w = mt.random_inputs(2, 2, 4)
  g = jax.jit(jax.grad(lambda x_: jnp.sum(module.apply({"params": params}, x_)[0][:, 4:] * w)))(x)
  assert np.all(np.asarray(g[:, :4]) == 0)


@pytest.mark.parametrize("field, value, match", [
    ("memory_size", 2, "memory_size=2 must be an int >= top_k=3"),
    ("top_k", 0, "top_k=0 must be a positive int"),
    ("segment_len", 0, "segment_len=0 must be a positive int"),
])
def test_bad_config_raises(field, value, match):
  module = mt.build("memorizing", **{field: value})
  with pytest.raises(ValueError, match=match):
    module.init(jax.random.key(0), mt.random_inputs(0, 1, 4))
