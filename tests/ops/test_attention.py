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


# name -> (input kwargs, op kwargs builder). bias "full" is [B,H,T,S], "row" [1,H,1,S];
# ids "random" (sorted random per side), "self" (one array for both sides), "empty" (query id
# 3 never appears among the keys: those rows see nothing).
CASES = {
    "causal": (dict(), lambda ids: dict()),
    "noncausal_cross": (dict(s=100), lambda ids: dict(causal=False)),
    "window": (dict(t=100), lambda ids: dict(window=7)),
    "gqa_window_bias": (dict(h=6, g=3, bias="full"), lambda ids: dict(window=20)),
    "mqa": (dict(h=4, g=1), lambda ids: dict()),
    "segment_ids": (dict(ids="self"), lambda ids: dict(segment_ids=ids[0])),
    "segment_pair_short_query": (dict(t=20, s=63),
                                 lambda ids: dict(segment_ids=(ids[0], ids[1]))),
    "bias_broadcast": (dict(bias="row"), lambda ids: dict()),
    "q_offset": (dict(t=30, s=63), lambda ids: dict(q_offset=10, window=12)),
    # Queries at -6..13: the first six see no key (empty rows through the offset).
    "q_offset_empty_rows": (dict(t=20, s=40), lambda ids: dict(q_offset=-6)),
    "segment_empty_rows": (dict(t=20, s=40, ids="empty"),
                           lambda ids: dict(segment_ids=(ids[0], ids[1]), causal=False)),
    "decode_t1": (dict(t=1, s=63, h=4, g=1), lambda ids: dict(window=40)),   # one query, last
    "t1": (dict(t=1), lambda ids: dict()),
    "long_t256": (dict(t=256, h=2, g=1, ids="self"),
                  lambda ids: dict(segment_ids=ids[0], window=100)),
}
HEAD_DIMS = (60, 64, 128)
BLOCKS = (16, 64)   # CHUNK_BLOCK_K for `chunked`: several blocks (ragged) / one or two blocks
# cuDNN (GPU only) takes bf16/fp16 and K == V a multiple of 8 (<= 128).
CUDNN_HEAD_DIMS = (64, 128)
ON_GPU = jax.default_backend() == "gpu"

# The default run samples the (impl, case, dtype, head dim, block) grid so that every value
# of every axis appears; the rest runs under -m slow. The block only matters for `chunked`.
DEFAULT = [
    ("xla", "causal", "float32", 60, 16), ("xla", "gqa_window_bias", "float32", 64, 16),
    ("xla", "segment_pair_short_query", "float32", 60, 16), ("xla", "q_offset", "float32", 60, 16),
    ("xla", "segment_empty_rows", "float32", 64, 16), ("xla", "t1", "float32", 128, 16),
    ("chunked", "noncausal_cross", "float32", 60, 16),
    ("chunked", "gqa_window_bias", "float32", 60, 64), ("chunked", "mqa", "float32", 128, 16),
    ("chunked", "segment_ids", "float32", 60, 16),
    ("chunked", "segment_pair_short_query", "float32", 64, 16),
    ("chunked", "bias_broadcast", "float32", 60, 16), ("chunked", "q_offset", "float32", 60, 16),
    ("chunked", "window", "float32", 64, 64), ("chunked", "q_offset_empty_rows", "float32", 60, 16),
    ("chunked", "decode_t1", "float32", 64, 16), ("chunked", "long_t256", "float32", 64, 64),
    ("xla", "causal", "bfloat16", 60, 16), ("chunked", "gqa_window_bias", "bfloat16", 128, 16),
    ("chunked", "long_t256", "bfloat16", 60, 16),
]
# On the GPU the default run adds cuDNN for every case it supports (each case with odd T or S
# and a mask/bias is made even: cuDNN rejects odd lengths there, see test_cudnn_refusals).
CUDNN = [("cudnn", c, "bfloat16", d, 16) for c in CASES for d in CUDNN_HEAD_DIMS]
if ON_GPU:
  DEFAULT += CUDNN
FULL = [(i, c, dt, d, bk) for i in ("xla", "chunked") for c in CASES
        for dt in ("float32", "bfloat16") for d in HEAD_DIMS
        for bk in (BLOCKS if i == "chunked" else BLOCKS[:1]) if (i, c, dt, d, bk) not in DEFAULT]


def _even(n):
  return n + n % 2


@functools.lru_cache(maxsize=None)
def _reference_result(case, dtype, d, even):
  q, k, v, bias, kw = _case_inputs(case, dtype, d, even)
  return _fwd_and_grads(lambda *a, **kw_: attn.attention(*a, impl="reference", **kw_),
                        q, k, v, bias, kw)


def _case_inputs(case, dtype, d, even=False):
  """q, k, v, bias, op kwargs of a case; even: odd T and S rounded up (for cuDNN)."""
  in_kw, op_kw = CASES[case]
  in_kw = dict(in_kw)
  ids_kind, bias_kind = in_kw.pop("ids", "random"), in_kw.pop("bias", None)
  t = in_kw.pop("t", 63)
  s = in_kw.pop("s", t)
  if even and (t % 2 or s % 2) and not (t == s == 1):   # T = S = 1 is cuDNN's aligned path
    t, s = _even(t), _even(s)
  h = in_kw.get("h", 4)
  bias_shape = {None: None, "full": (2, h, t, s), "row": (1, h, 1, s)}[bias_kind]
  q, k, v, bias, ids_q, ids_k = _inputs(t=t, s=s, d=d, dtype=jnp.dtype(dtype),
                                        bias_shape=bias_shape, **in_kw)
  if ids_kind == "self":
    ids_k = ids_q
  elif ids_kind == "empty":
    ids_q = jnp.tile((jnp.arange(t) % 4)[None], (2, 1))   # id 3 has no keys
    ids_k = jnp.tile((jnp.arange(s) % 3)[None], (2, 1))
  return q, k, v, bias, op_kw((ids_q, ids_k))


def _check_impl(impl, case, dtype, d, block, monkeypatch):
  monkeypatch.setattr(attn, "CHUNK_BLOCK_K", block)
  even = impl == "cudnn"
  q, k, v, bias, kw = _case_inputs(case, dtype, d, even)
  o, grads = _fwd_and_grads(lambda *a, **kw_: attn.attention(*a, impl=impl, **kw_),
                            q, k, v, bias, kw)
  o_ref, grads_ref = _reference_result(case, dtype, d, even)
  assert o.dtype == v.dtype
  rtol = RTOL[dtype]
  assert_rel_close(o, o_ref, rtol, f"{impl}/{case} o")
  assert_trees_rel_close(grads, grads_ref, rtol, f"{impl}/{case} grads")


@pytest.mark.parametrize("impl,case,dtype,d,block", DEFAULT)
def test_impl_matches_reference(impl, case, dtype, d, block, monkeypatch):
  _check_impl(impl, case, dtype, d, block, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("impl,case,dtype,d,block", FULL)
def test_impl_matches_reference_full_grid(impl, case, dtype, d, block, monkeypatch):
  _check_impl(impl, case, dtype, d, block, monkeypatch)


def test_default_grid_covers_every_axis_value():
  """The sampled default rows name every case, head dim, block and dtype at least once."""
  assert any(r[0] == "cudnn" for r in DEFAULT) == ON_GPU   # cuDNN rows exactly on the GPU
  rows = [r for r in DEFAULT if r[0] != "cudnn"]
  assert {r[1] for r in rows} == set(CASES)
  assert {r[3] for r in rows} == set(HEAD_DIMS)
  assert {r[4] for r in rows if r[0] == "chunked"} == set(BLOCKS)
  assert {r[2] for r in rows} == {"float32", "bfloat16"}
  ts = {_case_inputs(r[1], "float32", 8)[0].shape[1] for r in rows}
  assert {1, 256} <= ts


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


@pytest.mark.skipif(ON_GPU, reason="checks the message on a machine without a GPU")
def test_cudnn_on_cpu_is_a_clear_error():
  q, k, v, *_ = _inputs(t=8, dtype=jnp.bfloat16)
  with pytest.raises(RuntimeError, match="needs a GPU"):
    attn.attention(q, k, v, impl="cudnn")


def test_cudnn_refusals_and_auto_choice(monkeypatch):
  """What cuDNN cannot run raises a clear error, and `auto` on the GPU picks cuDNN exactly when
  it can run (else XLA). Runs on the CPU too: the platform is faked, and every refusal is
  raised before jax is asked for cuDNN."""
  monkeypatch.setattr(attn._impl, "platform", lambda: "gpu")
  bf16 = jnp.bfloat16

  def choice(t=64, s=None, d=64, dv=None, dtype=bf16, **kw):
    q, k, v, *_ = _inputs(t=t, s=s, d=d, dv=dv, dtype=dtype)
    spec = attn._Spec.make(q, k, v, True, None, kw.get("window"), kw.get("segment_ids"),
                           kw.get("bias"), kw.get("q_offset"), 0)
    return attn._attention_auto(q, k, v, kw.get("q_offset"), spec)["gpu"]

  ids = jnp.zeros((2, 64), jnp.int32)
  assert choice() == "cudnn"
  assert choice(t=63) == "cudnn"                      # no mask: cuDNN's own causal pattern
  assert choice(window=8) == "cudnn"
  assert choice(segment_ids=ids) == "cudnn"
  assert choice(bias=jnp.zeros((1, 4, 64, 64))) == "cudnn"
  assert choice(t=63, segment_ids=ids[:, :63]) == "xla"   # mask + odd T: backward refuses
  assert choice(t=63, bias=jnp.zeros((1, 4, 63, 63))) == "xla"
  assert choice(t=1, s=64) == "xla"                   # one query: T != S, odd T
  assert choice(q_offset=0) == "xla"
  assert choice(dtype=jnp.float32) == "xla"
  assert choice(d=60) == "xla"
  assert choice(d=64, dv=32) == "xla"
  assert choice(d=256) == "xla"
  for kw, match in [
      (dict(dtype=jnp.float32), "all bfloat16 or all float16"),
      (dict(d=60), "multiple of 8"),
      (dict(d=64, dv=32), "K == V"),
      (dict(t=63, op=dict(segment_ids=jnp.zeros((2, 63), jnp.int32))), "even T and S"),
      (dict(t=1, s=64), "even T and S"),
      (dict(t=20, s=41, op=dict(q_offset=3)), "even T and S"),
  ]:
    op = kw.pop("op", {})
    kw.setdefault("d", 64)
    q, k, v, *_ = _inputs(dtype=kw.pop("dtype", bf16), **kw)
    with pytest.raises(RuntimeError, match=match):
      attn.attention(q, k, v, impl="cudnn", **op)


@pytest.mark.skipif(not ON_GPU, reason="needs cuDNN (a GPU)")
def test_cudnn_odd_lengths_with_a_mask_really_fail_in_jax():
  """The even-length rule above is jax's (cuDNN backward with a bias): if this stops raising,
  the rule in seqmix.ops.attention._cudnn_unsupported can go."""
  q, k, v, *_ = _inputs(t=63, d=64, dtype=jnp.bfloat16)
  mask = jnp.tril(jnp.ones((63, 63), bool))[None, None]
  f = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
      q, k, v, mask=mask, implementation="cudnn").astype(jnp.float32))
  with pytest.raises(NotImplementedError, match="sequence length"):
    jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v)


def test_unknown_impl():
  # impl="pallas" is built (tests/kernels_pallas/test_flash_attention_kernel.py); xla returns no lse.
  q, k, v, *_ = _inputs(t=8)
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
