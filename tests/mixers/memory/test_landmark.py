"""landmark against a float64 loop over queries (the grouped softmax written per block)."""

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


def _oracle(x, p, positions, seg, lb):
  b, t, d = x.shape
  wq, wk, wv = (p[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj"))
  wo = p["o_proj"]["kernel"]
  h, dh = wq.shape[1:]
  y = np.zeros((b, t, d))
  for bi in range(b):
    ps, ss = positions[bi], seg[bi]
    q = np.stack([_rope(np.einsum("d,dhe->he", x[bi, i], wq), ps[i]) for i in range(t)])
    k = np.stack([_rope(np.einsum("d,dhe->he", x[bi, i], wk), ps[i]) for i in range(t)])
    v = np.einsum("td,dhe->the", x[bi], wv)
    for i in range(t):
      c = ps[i] // lb
      vis = [j for j in range(i + 1) if ss[j] == ss[i]]
      o = np.zeros((h, dh))
      for hh in range(h):
        sc = {j: q[i, hh] @ k[j, hh] / np.sqrt(dh) for j in vis}
        cur = [j for j in vis if ps[j] // lb == c]
        blocks = sorted({ps[j] // lb for j in vis if ps[j] // lb < c})
        lms = {bb: [j for j in vis if ps[j] // lb == bb and ps[j] % lb == lb - 1] for bb in blocks}
        z = sum(np.exp(sc[j]) for j in cur) + sum(np.exp(sc[l]) for bb in blocks for l in lms[bb])
        acc = sum(np.exp(sc[j]) * v[j, hh] for j in cur) / z
        for bb in blocks:
          if not lms[bb]:
            continue
          mem = [j for j in vis if ps[j] // lb == bb and ps[j] % lb != lb - 1]
          den = sum(np.exp(sc[j]) for j in mem)
          gate = np.exp(sc[lms[bb][0]]) / z
          acc = acc + sum(gate * np.exp(sc[j]) / den * v[j, hh] for j in mem)
        o[hh] = acc
      y[bi, i] = np.einsum("he,hed->d", o, wo)
  return y


@pytest.mark.parametrize("lb, packed", [(4, False), (3, True), (2, False)])
def test_matches_direct_formula(lb, packed):
  module = mt.build("landmark", block_len=lb)
  t = 14
  x = mt.random_inputs(0, 2, t)
  if packed:
    seg, pos = mt.packed_pair(x, 5)
  else:
    seg = jnp.zeros((2, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  params = mt.init_params(module, x)
  y = jax.jit(module.apply)({"params": params}, x, segment_ids=seg if packed else None,
                            positions=pos if packed else None)[0]
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = _oracle(np.asarray(x, np.float64), p64, np.asarray(pos), np.asarray(seg), lb)
  assert_rel_close(y, want, 1e-5, "landmark vs direct formula")


@pytest.mark.parametrize("field, value, match", [
    ("block_len", 1, "block_len=1 must be an int >= 2"),
    ("position", "alibi", "position='alibi' is not one of"),
])
def test_bad_config_raises(field, value, match):
  module = mt.build("landmark", **{field: value})
  with pytest.raises(ValueError, match=match):
    module.init(jax.random.key(0), mt.random_inputs(0, 1, 4))
