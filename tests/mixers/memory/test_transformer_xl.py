"""transformer_xl against a float64 NumPy loop over queries (the docstring's definition),
its stop-gradient memory, and its config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.models import segment_recurrent as sr
from seqmix.testing import assert_rel_close


def _oracle(x, p, positions, seg, seg_len, mem_len):
  """Per query i: keys j with the same document, j <= i, i − j <= L − 1 + M, p_j >= s_i − M;
  logits ((q_i + u)·k_j + (q_i + v)·W_R R_{p_i − p_j}) / √Dh."""
  b, t, d = x.shape
  wq, wk, wv = (p[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj"))
  wr, wo, u, vb = p["r_proj"]["kernel"], p["o_proj"]["kernel"], p["u"], p["v"]
  dh = wq.shape[-1]
  half = np.arange(0, d, 2) / d
  y = np.zeros((b, t, d))
  for bi in range(b):
    q = np.einsum("td,dhe->the", x[bi], wq)
    k = np.einsum("td,dhe->the", x[bi], wk)
    v = np.einsum("td,dhe->the", x[bi], wv)
    for i in range(t):
      first = (positions[bi, i] // seg_len) * seg_len
      js = [j for j in range(t) if seg[bi, j] == seg[bi, i] and j <= i
            and i - j <= seg_len - 1 + mem_len and positions[bi, j] >= first - mem_len]
      logits = []
      for j in js:
        dist = positions[bi, i] - positions[bi, j]
        rel = np.concatenate([np.sin(dist / 10000.0 ** half), np.cos(dist / 10000.0 ** half)])
        r = np.einsum("d,dhe->he", rel, wr)
        logits.append(np.sum((q[i] + u) * k[j], -1) + np.sum((q[i] + vb) * r, -1))
      a = np.stack(logits, -1) / np.sqrt(dh)                # [h, |js|]
      a = np.exp(a - a.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      o = np.einsum("hj,jhe->he", a, v[js])
      y[bi, i] = np.einsum("he,hed->d", o, wo)
  return y


@pytest.mark.parametrize("seg_len, mem_len, packed", [(4, 3, False), (4, 6, True),
                                                      (3, 0, False), (5, 5, True)])
def test_matches_direct_formula(seg_len, mem_len, packed):
  module = mt.build("transformer_xl", segment_len=seg_len, mem_len=mem_len)
  t = 15
  x = mt.random_inputs(0, 2, t)
  if packed:
    seg, pos = mt.packed_pair(x, 6)
  else:
    seg = jnp.zeros((2, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
  params = mt.init_params(module, x)
  y = module.apply({"params": params}, x, segment_ids=seg if packed else None,
                   positions=pos if packed else None)[0]
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = _oracle(np.asarray(x, np.float64), p64, np.asarray(pos), np.asarray(seg),
                 seg_len, mem_len)
  assert_rel_close(y, want, 1e-5, "transformer_xl vs direct formula")


def test_memory_is_stop_gradient():
  """A loss on segment 2 gets no gradient to segment-1 inputs: the memory is SG(h)."""
  module = mt.build("transformer_xl", segment_len=4, mem_len=4)
  x = mt.random_inputs(1, 2, 8)
  params = mt.init_params(module, x)
  w = mt.random_inputs(2, 2, 4)
  g = jax.jit(jax.grad(lambda x_: jnp.sum(module.apply({"params": params}, x_)[0][:, 4:] * w)))(x)
  assert np.all(np.asarray(g[:, :4]) == 0)
  assert np.abs(np.asarray(g[:, 4:])).max() > 0
  # ...while the memory still changes the values.
  fwd = jax.jit(lambda x_: module.apply({"params": params}, x_)[0])
  y, y0 = fwd(x), fwd(x.at[:, :4].set(0.0))
  assert np.abs(np.asarray(y[:, 4:] - y0[:, 4:])).max() > 1e-3


def test_segment_recurrent_run_equals_parallel():
  """The wrapper with segment_len = L: same values and, the memory being SG, same grads."""
  module = mt.build("transformer_xl", segment_len=4, mem_len=5)
  x = mt.random_inputs(3, 2, 12)
  params = mt.init_params(module, x)
  run = jax.jit(lambda p: sr.run_segments(module, {"params": p}, x, segment_len=4)[0])
  par = jax.jit(lambda p: module.apply({"params": p}, x)[0])
  assert_rel_close(run(params), par(params), 1e-5, "segments vs parallel")
  w = mt.random_inputs(4, 2, 12)
  g1 = jax.jit(jax.grad(lambda p: jnp.sum(run(p) * w)))(params)
  g2 = jax.jit(jax.grad(lambda p: jnp.sum(par(p) * w)))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert_rel_close(a, b, 1e-5, "param grads, segments vs parallel")


@pytest.mark.parametrize("field, value, match", [
    ("segment_len", 0, "segment_len=0 must be a positive int"),
    ("mem_len", -1, "mem_len=-1 must be an int >= 0"),
    ("num_heads", 3, "d_model=32 must be divisible by num_heads=3"),
])
def test_bad_config_raises(field, value, match):
  module = mt.build("transformer_xl", **{field: value})
  with pytest.raises(ValueError, match=match):
    module.init(jax.random.key(0), mt.random_inputs(0, 1, 4))
