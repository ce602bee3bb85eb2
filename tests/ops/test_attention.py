"""seqmix.ops.attention: every form against the float32 reference (outputs and gradients of
q, k, v, bias), the reference against a per-query numpy loop, lse merging, empty rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops import attention as attn
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

# Several key blocks with a ragged last one at T = 63 / 100.
SMALL_BLOCK = 16


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
  monkeypatch.setattr(attn, "CHUNK_BLOCK_K", SMALL_BLOCK)


def _np_attention(q, k, v, *, causal=True, scale=None, window=None, q_ids=None, kv_ids=None,
                  bias=None, q_offset=None, kv_offset=0):
  """The contract written out query by query in float64: (o [B,T,H,V], lse [B,T,H])."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  q_ids = None if q_ids is None else np.asarray(q_ids)
  kv_ids = None if kv_ids is None else np.asarray(kv_ids)
  b, t, h, d = q.shape
  s, g = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  q_offset = kv_offset + s - t if q_offset is None else q_offset
  bias = None if bias is None else np.broadcast_to(np.asarray(bias, np.float64), (b, h, t, s))
  o = np.zeros((b, t, h, v.shape[-1]))
  lse = np.full((b, t, h), -np.inf)
  for bi in range(b):
    for hi in range(h):
      kh = hi // (h // g)
      for i in range(t):
        qp = q_offset + i
        js = [j for j in range(s)
              if (not causal or kv_offset + j <= qp)
              and (window is None or kv_offset + j > qp - window)
              and (q_ids is None or q_ids[bi, i] == kv_ids[bi, j])]
        if not js:
          continue
        logits = np.array([scale * q[bi, i, hi] @ k[bi, j, kh]
                           + (0.0 if bias is None else bias[bi, hi, i, j]) for j in js])
        mx = logits.max()
        w = np.exp(logits - mx)
        lse[bi, i, hi] = mx + np.log(w.sum())
        o[bi, i, hi] = (w / w.sum()) @ v[bi, js, kh]
  return o, lse


def _inputs(b=2, t=63, s=None, h=4, g=2, d=60, dv=None, dtype=jnp.float32, seed=0,
            bias_shape=None, n_seg=3):
  """Random q, k, v (dtype), float32 bias, and sorted segment ids (packed documents)."""
  s = t if s is None else s
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
  k = jnp.asarray(rng.standard_normal((b, s, g, d)), dtype)
  v = jnp.asarray(rng.standard_normal((b, s, g, dv or d)), dtype)
  bias = None if bias_shape is None else jnp.asarray(rng.standard_normal(bias_shape),
                                                     jnp.float32)
  ids_q = jnp.asarray(np.sort(rng.integers(0, n_seg, (b, t)), axis=1), jnp.int32)
  ids_k = jnp.asarray(np.sort(rng.integers(0, n_seg, (b, s)), axis=1), jnp.int32)
  return q, k, v, bias, ids_q, ids_k


def _fwd_and_grads(fn, q, k, v, bias, kw):
  """o and the gradients of <o, w> (w fixed, random) w.r.t. q, k, v (and bias)."""
  w = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape[:3] + (v.shape[-1],)),
                  jnp.float32)

  def loss(q, k, v, bias):
    o = fn(q, k, v, bias=bias, **kw)[0]
    return jnp.sum(o.astype(jnp.float32) * w), o

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(
      q, k, v, bias)
  return o, grads


# name -> (input kwargs, op kwargs builder)
CASES = {
    "causal": (dict(), lambda ids: dict()),
    "noncausal_cross": (dict(s=100), lambda ids: dict(causal=False)),
    "window": (dict(t=100), lambda ids: dict(window=7)),
    "gqa_window_bias": (dict(h=6, g=3, bias_shape=(2, 6, 63, 63)),
                        lambda ids: dict(window=20)),
    "mqa": (dict(h=4, g=1), lambda ids: dict()),
    "segment_ids": (dict(), lambda ids: dict(segment_ids=ids[0])),
    "segment_pair_short_query": (dict(t=20, s=63),
                                 lambda ids: dict(segment_ids=(ids[0], ids[1]))),
    "bias_broadcast": (dict(bias_shape=(1, 4, 1, 63)), lambda ids: dict()),
    "q_offset": (dict(t=30, s=63), lambda ids: dict(q_offset=10, window=12)),
}
# The default run samples the (impl, case, dtype) grid; the rest runs under -m slow.
DEFAULT = [
    ("xla", "causal", "float32"), ("xla", "gqa_window_bias", "float32"),
    ("xla", "segment_pair_short_query", "float32"), ("xla", "q_offset", "float32"),
    ("chunked", "noncausal_cross", "float32"), ("chunked", "gqa_window_bias", "float32"),
    ("chunked", "mqa", "float32"), ("chunked", "segment_ids", "float32"),
    ("chunked", "segment_pair_short_query", "float32"), ("chunked", "bias_broadcast", "float32"),
    ("chunked", "q_offset", "float32"), ("xla", "causal", "bfloat16"),
    ("chunked", "gqa_window_bias", "bfloat16"),
]
FULL = [(i, c, d) for i in ("xla", "chunked") for c in CASES for d in ("float32", "bfloat16")
        if (i, c, d) not in DEFAULT]


@functools.lru_cache(maxsize=None)
def _reference_result(case, dtype):
  q, k, v, bias, kw = _case_inputs(case, dtype)
  return _fwd_and_grads(lambda *a, **kw_: attn.attention(*a, impl="reference", **kw_),
                        q, k, v, bias, kw)


def _case_inputs(case, dtype):
  in_kw, op_kw = CASES[case]
  q, k, v, bias, ids_q, ids_k = _inputs(dtype=jnp.dtype(dtype), **in_kw)
  if case == "segment_ids":
    ids_k = ids_q
  return q, k, v, bias, op_kw((ids_q, ids_k))


def _check_impl(impl, case, dtype):
  q, k, v, bias, kw = _case_inputs(case, dtype)
  o, grads = _fwd_and_grads(lambda *a, **kw_: attn.attention(*a, impl=impl, **kw_),
                            q, k, v, bias, kw)
  o_ref, grads_ref = _reference_result(case, dtype)
  assert o.dtype == v.dtype
  rtol = RTOL[dtype]
  assert_rel_close(o, o_ref, rtol, f"{impl}/{case} o")
  assert_trees_rel_close(grads, grads_ref, rtol, f"{impl}/{case} grads")


@pytest.mark.parametrize("impl,case,dtype", DEFAULT)
def test_impl_matches_reference(impl, case, dtype):
  _check_impl(impl, case, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("impl,case,dtype", FULL)
def test_impl_matches_reference_full_grid(impl, case, dtype):
  _check_impl(impl, case, dtype)


@pytest.mark.parametrize("kw", [
    dict(h=4, g=2, op=dict(q_offset=5, window=9), bias_shape=(2, 4, 12, 20), pair=True),
    dict(h=3, g=1, op=dict(causal=False), bias_shape=None, pair=True),
    dict(h=2, g=2, op=dict(), bias_shape=(2, 1, 12, 20), pair=False),
])
def test_reference_matches_numpy_loop(kw):
  """The oracle itself against the contract written out query by query."""
  q, k, v, bias, ids_q, ids_k = _inputs(t=12, s=20, h=kw["h"], g=kw["g"], d=6, dv=5,
                                        bias_shape=kw["bias_shape"])
  op = dict(kw["op"])
  if kw["pair"]:
    op["segment_ids"] = (ids_q, ids_k)
  o, lse = jax.jit(lambda q, k, v, bias: attn.blockwise_attention(
      q, k, v, bias=bias, impl="reference", kv_offset=4, **op))(q, k, v, bias)
  o_np, lse_np = _np_attention(q, k, v, bias=bias, kv_offset=4,
                               q_ids=ids_q if kw["pair"] else None,
                               kv_ids=ids_k if kw["pair"] else None, **kw["op"])
  assert_rel_close(o, o_np, 1e-5, "o")
  finite = np.isfinite(lse_np)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  assert_rel_close(np.asarray(lse)[finite], lse_np[finite], 1e-5, "lse")


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_blockwise_traced_offsets_under_jit(impl):
  """q_offset / kv_offset as traced scalars give the same result as static ones."""
  q, k, v, bias, _, _ = _inputs(t=24, s=40, bias_shape=(1, 4, 24, 40))

  @jax.jit
  def run(q, k, v, bias, qo, ko):
    return attn.blockwise_attention(q, k, v, bias=bias, q_offset=qo, kv_offset=ko, window=30,
                                    impl=impl)

  # Queries at 10..33, keys at 20..59: the first ten queries see no key.
  o, lse = run(q, k, v, bias, jnp.int32(10), jnp.int32(20))
  o_np, lse_np = _np_attention(q, k, v, bias=bias, q_offset=10, kv_offset=20, window=30)
  assert_rel_close(o, o_np, 1e-5, "o")
  finite = np.isfinite(lse_np)
  assert not finite.all() and finite.any()   # the case really has empty rows
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  assert_rel_close(np.asarray(lse)[finite], lse_np[finite], 1e-5, "lse")
  # Gradients through traced offsets match the reference with static offsets.
  f = lambda impl_, qo, ko: lambda q, k, v: jnp.sum(jnp.sin(attn.blockwise_attention(
      q, k, v, q_offset=qo, kv_offset=ko, window=30, impl=impl_)[0]))
  g = jax.jit(lambda q, k, v, qo, ko: jax.grad(f(impl, qo, ko), (0, 1, 2))(q, k, v))(
      q, k, v, jnp.int32(10), jnp.int32(20))
  g_ref = jax.jit(jax.grad(f("reference", 10, 20), (0, 1, 2)))(q, k, v)
  assert_trees_rel_close(g, g_ref, 1e-5, "grads")


def test_attention_traced_q_offset_xla():
  q, k, v, _, _, _ = _inputs(t=10, s=30)
  run = jax.jit(lambda q, k, v, qo: attn.attention(q, k, v, q_offset=qo, impl="xla")[0])
  o_np, _ = _np_attention(q, k, v, q_offset=7)
  assert_rel_close(run(q, k, v, jnp.int32(7)), o_np, 1e-5, "o")


@pytest.mark.parametrize("impl", ["reference", "xla", "chunked"])
def test_empty_rows_zero_output_finite_zero_grads(impl):
  """Queries whose segment id never appears among the keys see nothing: o = 0, zero grads."""
  q, k, v, bias, _, _ = _inputs(t=20, s=40, bias_shape=(2, 4, 20, 40))
  ids_q = jnp.tile((jnp.arange(20) % 4)[None], (2, 1))      # id 3 has no keys
  ids_k = jnp.tile((jnp.arange(40) % 3)[None], (2, 1))
  empty = np.asarray(ids_q == 3)
  kw = dict(segment_ids=(ids_q, ids_k), causal=False)
  o, grads = _fwd_and_grads(lambda *a, **kw_: attn.attention(*a, impl=impl, **kw_),
                            q, k, v, bias, kw)
  o = np.asarray(o)
  assert np.all(o[empty] == 0) and np.all(np.abs(o[~empty]).sum(-1) > 0)
  for x in grads:
    assert np.all(np.isfinite(np.asarray(x)))
  assert np.all(np.asarray(grads[0])[empty] == 0)                   # dq of empty rows
  assert np.all(np.asarray(grads[3]).transpose(0, 2, 1, 3)[empty] == 0)  # dbias of empty rows
  if impl != "xla":
    _, lse = jax.jit(lambda q, k, v, bias: attn.blockwise_attention(
        q, k, v, bias=bias, impl=impl, **kw))(q, k, v, bias)
    assert np.all(np.asarray(lse)[empty] == -np.inf)
    assert np.all(np.isfinite(np.asarray(lse)[~empty]))


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_merge_partials_of_two_key_blocks_equals_whole(impl):
  """Split keys in two blocks (kv_offset), merge through lse: equals attention over all keys,
  in values and in gradients (some rows see nothing of the second block: lse₂ = −inf)."""
  q, k, v, bias, ids_q, ids_k = _inputs(t=63, s=63, bias_shape=(2, 4, 63, 63))
  cut = 25
  w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)

  def whole(q, k, v, bias):
    o, lse = attn.blockwise_attention(q, k, v, bias=bias, segment_ids=ids_q, window=40,
                                      impl="reference")
    return jnp.sum(o * w) + jnp.sum(lse[..., :1]), (o, lse)

  def merged(q, k, v, bias):
    parts = [attn.blockwise_attention(q, k[:, sl], v[:, sl], bias=bias[..., sl],
                                      segment_ids=(ids_q, ids_q[:, sl]), window=40,
                                      q_offset=0, kv_offset=sl.start, impl=impl)
             for sl in (slice(0, cut), slice(cut, 63))]
    o, lse = attn.merge_partials(*parts[0], *parts[1])
    return jnp.sum(o * w) + jnp.sum(lse[..., :1]), (o, lse)

  (_, (o, lse)), g = jax.jit(jax.value_and_grad(merged, (0, 1, 2, 3), has_aux=True))(
      q, k, v, bias)
  (_, (o_ref, lse_ref)), g_ref = jax.jit(jax.value_and_grad(whole, (0, 1, 2, 3), has_aux=True))(
      q, k, v, bias)
  assert_rel_close(o, o_ref, 1e-5, "o")
  assert_rel_close(lse, lse_ref, 1e-5, "lse")
  assert_trees_rel_close(g, g_ref, 1e-5, "grads")


def test_merge_partials_both_empty():
  o = jnp.zeros((1, 2, 1, 3))
  lse = jnp.full((1, 2, 1), -jnp.inf)
  f = lambda o1, l1: jnp.sum(attn.merge_partials(o1, l1, o, lse)[0])
  om, lm = attn.merge_partials(o, lse, o, lse)
  assert np.all(np.asarray(om) == 0) and np.all(np.asarray(lm) == -np.inf)
  g = jax.grad(f, (0, 1))(o, lse)
  assert all(np.all(np.asarray(x) == 0) for x in g)


def test_auto_matches_reference():
  q, k, v, _, ids, _ = _inputs(t=30)
  o = attn.attention(q, k, v, segment_ids=ids)[0]
  assert_rel_close(o, attn.attention(q, k, v, segment_ids=ids, impl="reference")[0], 1e-5)
  o, lse = attn.blockwise_attention(q, k, v, segment_ids=ids)
  assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32


def test_cudnn_on_cpu_is_a_clear_error():
  q, k, v, *_ = _inputs(t=8, dtype=jnp.bfloat16)
  with pytest.raises(RuntimeError, match="needs a GPU"):
    attn.attention(q, k, v, impl="cudnn")


def test_pallas_not_built():
  q, k, v, *_ = _inputs(t=8)
  with pytest.raises(NotImplementedError, match="reference"):
    attn.attention(q, k, v, impl="pallas")
  with pytest.raises(NotImplementedError, match="chunked"):
    attn.blockwise_attention(q, k, v, impl="pallas")
  with pytest.raises(ValueError, match="unknown impl"):
    attn.blockwise_attention(q, k, v, impl="xla")


def test_bad_arguments():
  q, k, v, *_ = _inputs(t=8, h=4, g=3, d=4)
  with pytest.raises(ValueError, match="multiple of the 3 key/value heads"):
    attn.attention(q, k, v, impl="reference")
  q, k, v, _, ids_q, ids_k = _inputs(t=8, s=12, d=4)
  with pytest.raises(ValueError, match="needs causal=True"):
    attn.attention(q, k, v, causal=False, window=3)
  with pytest.raises(ValueError, match="as a pair"):
    attn.attention(q, k, v, segment_ids=ids_q)
  with pytest.raises(ValueError, match="does not broadcast"):
    attn.attention(q, k, v, bias=jnp.zeros((3, 8, 12)))


def test_attention_dropout_matches_manual_and_is_reference_only():
  """Dropout on the probabilities: inverted dropout of the normalised softmax; other impls refuse."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import pytest
  from seqmix.ops import attention as attn
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  q, k, v = (jax.random.normal(ks[i], (2, 9, 2, 8)) for i in range(3))
  rate = 0.3
  o, _ = attn.attention(q, k, v, dropout_rate=rate, dropout_rng=ks[3])
  s = jnp.einsum("bthk,bshk->bhts", q, k) * 8 ** -0.5
  s = jnp.where(jnp.tril(jnp.ones((9, 9), bool)), s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  keep = jax.random.bernoulli(ks[3], 1.0 - rate, p.shape)
  want = jnp.einsum("bhts,bshv->bthv", jnp.where(keep, p / (1 - rate), 0.0), v)
  np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-6)
  o0, _ = attn.attention(q, k, v, impl="reference")
  assert float(jnp.max(jnp.abs(o - o0))) > 1e-3  # dropout did something
  with pytest.raises(ValueError, match="no attention dropout"):
    attn.attention(q, k, v, dropout_rate=rate, dropout_rng=ks[3], impl="chunked")
  with pytest.raises(ValueError, match="dropout_rng"):
    attn.attention(q, k, v, dropout_rate=rate)
