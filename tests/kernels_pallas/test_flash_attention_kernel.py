"""kernels_pallas/attention (flash attention, `impl="pallas"`) against the float32 reference.

Outputs o, lse and the gradients of q, k, v (through a loss that also weights lse, so the
lse cotangent path of the backward is checked) for every mask combination of the contract;
T in {1, 63, 100} with blocks of 16 so several blocks, ragged last blocks and the causal /
window block skipping are exercised; head dim 60 (padded to 64 inside the op); float32 and
bfloat16. `TestFlashAttention` runs the compiled kernels (GPU only);
`TestFlashAttentionInterpret` runs the same bodies in the Pallas interpreter on CPU.

(The file is not named test_attention.py: tests/ops has one, and the tests directory is not
a package, so pytest would refuse two modules of one basename.)
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.attention import kernel as _k
from kernels_pallas.attention import ops as flash
from seqmix.ops import attention as attn
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

SMALL = flash.BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16,
                         block_q_dq=16, block_k_dq=16)
# Unequal forward / backward tiles: the dK/dV and dQ loops step by other sizes than the
# forward, and T is padded to the largest.
MIXED = flash.BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32,
                         block_q_dq=32, block_k_dq=16)

# dQ accumulated with atomic adds inside the dK/dV pass (no dQ pass).
ATOMIC = dataclasses.replace(MIXED, dq_atomic=True)


def _inputs(b=2, t=63, s=None, h=2, g=2, d=60, dv=None, dtype=jnp.float32, seed=0, n_seg=3):
  s = t if s is None else s
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), dtype)
  k = jnp.asarray(rng.standard_normal((b, s, g, d)), dtype)
  v = jnp.asarray(rng.standard_normal((b, s, g, dv or d)), dtype)
  ids_q = jnp.asarray(np.sort(rng.integers(0, n_seg, (b, t)), axis=1), jnp.int32)
  ids_k = jnp.asarray(np.sort(rng.integers(0, n_seg, (b, s)), axis=1), jnp.int32)
  return q, k, v, ids_q, ids_k


# name -> (input kwargs, op kwargs from (ids_q, ids_k)); op kwargs are blockwise_attention's.
CASES = {
    "causal": (dict(), lambda ids: dict()),
    "noncausal_cross": (dict(s=100), lambda ids: dict(causal=False)),
    "window_gqa": (dict(t=100, h=4, g=2), lambda ids: dict(window=7)),
    "mqa": (dict(h=4, g=1, dv=24), lambda ids: dict()),
    "segment_ids": (dict(), lambda ids: dict(segment_ids=ids[0])),
    "segment_pair_short_query": (dict(t=20, s=63),
                                 lambda ids: dict(segment_ids=(ids[0], ids[1]))),
    "q_offset_window": (dict(t=30, s=63), lambda ids: dict(q_offset=10, window=12)),
    "kv_offset_window_segments": (dict(t=40, s=63, h=4, g=1), lambda ids: dict(
        q_offset=50, kv_offset=20, window=30, segment_ids=(ids[0], ids[1]))),
    "decode_t1": (dict(t=1, s=100), lambda ids: dict(window=40)),
    "empty_rows": (dict(t=63, s=40), lambda ids: dict(q_offset=0, kv_offset=30)),
    # Windows against 16-wide blocks: 21 straddles two block boundaries at shift 7; 16 equals
    # a block at an unaligned shift; 3 is smaller than a block (the window edge and the
    # diagonal fall in one block).
    "window_straddle_offsets": (dict(t=100, s=100), lambda ids: dict(
        q_offset=37, kv_offset=30, window=21)),
    "window_block_unaligned": (dict(t=63, s=63), lambda ids: dict(q_offset=9, window=16)),
    "window_below_block_offsets": (dict(t=40, s=63, h=2, g=1), lambda ids: dict(
        q_offset=45, kv_offset=3, window=3)),
}
# The default suite samples (case, dtype, blocks); everything else runs under -m slow.
DEFAULT = [
    ("causal", "float32", "small"), ("segment_pair_short_query", "float32", "mixed"),
    ("kv_offset_window_segments", "float32", "small"), ("decode_t1", "float32", "small"),
    ("mqa", "bfloat16", "mixed"), ("window_straddle_offsets", "float32", "small"),
    ("kv_offset_window_segments", "float32", "atomic"),
]
FULL = [(c, d, b) for c in CASES for d in ("float32", "bfloat16") for b in ("small", "mixed")
        if (c, d, b) not in DEFAULT] + [
            ("causal", "bfloat16", "atomic"), ("window_straddle_offsets", "float32", "atomic"),
            ("empty_rows", "float32", "atomic"), ("noncausal_cross", "float32", "atomic")]
BLOCKS = {"small": SMALL, "mixed": MIXED, "atomic": ATOMIC}
# The oracle's float32 einsums in full precision: on a GPU the default is TF32 (~1e-3), which
# would fail the float32 comparison whatever the kernel does.
_ORACLE_PRECISION = lambda: jax.default_matmul_precision("highest")

# The interpreted kernels make large CPU programs whose XLA compile dominates these tests;
# the cheaper backend passes halve it and do not change what is computed.
_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _run(f, *args):
  """jit(f)(*args), compiled with the cheap CPU options on CPU."""
  lowered = jax.jit(f).lower(*args)
  opts = _CPU_COMPILE if jax.default_backend() == "cpu" else None
  return lowered.compile(compiler_options=opts)(*args)


def _case(case, dtype):
  in_kw, op_kw = CASES[case]
  q, k, v, ids_q, ids_k = _inputs(dtype=jnp.dtype(dtype), **in_kw)
  if case == "segment_ids":
    ids_k = ids_q
  return q, k, v, op_kw((ids_q, ids_k))


def _loss_and_grads(fn, q, k, v):
  """(o, lse) and the gradients w.r.t. q, k, v of <o, w> + <lse, w2> (lse finite entries)."""
  rng = np.random.default_rng(7)
  w = jnp.asarray(rng.standard_normal(q.shape[:3] + (v.shape[-1],)), jnp.float32)
  w2 = jnp.asarray(rng.standard_normal(q.shape[:3]), jnp.float32)

  def loss(q, k, v):
    o, lse = fn(q, k, v)
    lse_f = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(lse_f * w2), (o, lse)

  (_, (o, lse)), grads = _run(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), q, k, v)
  return o, lse, grads


@functools.lru_cache(maxsize=None)
def _reference(case, dtype):
  q, k, v, kw = _case(case, dtype)
  with _ORACLE_PRECISION():
    return _loss_and_grads(
        lambda q, k, v: attn.blockwise_attention(q, k, v, impl="reference", **kw), q, k, v)


def _kernel_kwargs(q, k, kw, blocks, interpret):
  """blockwise_attention's keyword arguments in the kernel entry's terms."""
  t, s = q.shape[1], k.shape[1]
  kv_offset = kw.get("kv_offset", 0)
  q_offset = kw.get("q_offset", kv_offset + s - t)
  seg = kw.get("segment_ids")
  q_ids = kv_ids = None
  if seg is not None:
    q_ids, kv_ids = seg if isinstance(seg, tuple) else (seg, seg)
  return dict(shift=q_offset - kv_offset, causal=kw.get("causal", True),
              window=kw.get("window"), q_ids=q_ids, kv_ids=kv_ids, block_sizes=blocks,
              interpret=interpret)


def _assert_lse_close(lse, lse_ref, rtol, name="lse"):
  lse, lse_ref = np.asarray(lse), np.asarray(lse_ref)
  finite = np.isfinite(lse_ref)
  np.testing.assert_array_equal(np.isfinite(lse), finite, err_msg=f"{name}: −inf pattern")
  assert np.all(lse[~finite] == -np.inf), f"{name}: empty rows must be −inf"
  assert_rel_close(lse[finite], lse_ref[finite], rtol, name)


class TestFlashAttention:
  """The compiled kernels (GPU only)."""
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_backend(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("compiled Pallas kernels need a GPU (the Interpret twin runs on CPU)")

  def _check(self, case, dtype, blocks):
    q, k, v, kw = _case(case, dtype)
    fkw = _kernel_kwargs(q, k, kw, BLOCKS[blocks], self.INTERPRET)
    o, lse, grads = _loss_and_grads(lambda q, k, v: flash.flash_attention(q, k, v, **fkw),
                                    q, k, v)
    o_ref, lse_ref, grads_ref = _reference(case, dtype)
    rtol = RTOL[dtype]
    assert o.dtype == v.dtype and lse.dtype == jnp.float32
    assert o.shape == o_ref.shape and lse.shape == lse_ref.shape
    assert_rel_close(o, o_ref, rtol, f"{case} o")
    # lse is float32 from float32 accumulators whatever the input dtype; bf16 inputs only
    # round the logits (|s| ~ a few, so ~1e-2 absolute of an lse ~ 4 is ~3e-3 relative).
    _assert_lse_close(lse, lse_ref, rtol, f"{case} lse")
    assert_trees_rel_close(grads, grads_ref, rtol, f"{case} grads")

  @pytest.mark.parametrize("case,dtype,blocks", DEFAULT)
  def test_matches_reference(self, case, dtype, blocks):
    self._check(case, dtype, blocks)

  @pytest.mark.slow
  @pytest.mark.parametrize("case,dtype,blocks", FULL)
  def test_matches_reference_full_grid(self, case, dtype, blocks):
    # On the GPU every case is a few Triton compiles; the device session has minutes for all
    # kernel tests, so the compiled full grid is opt-in there.
    if not self.INTERPRET and os.environ.get("SEQMIX_GPU_FULL_GRID") != "1":
      pytest.skip("compiled full grid: set SEQMIX_GPU_FULL_GRID=1")
    self._check(case, dtype, blocks)

  def test_float32_default_tiles_match_reference(self):
    """float32 with the default (shared-memory fitted) tiles at head dim 128: on the GPU this
    is the configuration that used to fail with RESOURCE_EXHAUSTED; several key blocks."""
    q, k, v, _, _ = _inputs(b=1, t=100, h=2, g=1, d=128)
    kw = dict(window=70)
    fkw = _kernel_kwargs(q, k, kw, None, self.INTERPRET)
    assert flash.default_block_sizes(jnp.float32, 128, 128).block_k < 100
    o, lse, grads = _loss_and_grads(lambda q, k, v: flash.flash_attention(q, k, v, **fkw),
                                    q, k, v)
    with _ORACLE_PRECISION():
      o_ref, lse_ref, grads_ref = _loss_and_grads(
          lambda q, k, v: attn.blockwise_attention(q, k, v, impl="reference", **kw), q, k, v)
    assert_rel_close(o, o_ref, 1e-5, "o")
    _assert_lse_close(lse, lse_ref, 1e-5)
    assert_trees_rel_close(grads, grads_ref, 1e-5, "grads")

  def test_empty_rows_zero_output_and_zero_grads(self):
    """Queries before every key (offsets) or with a segment id no key has: o = 0,
    lse = −inf, gradients exactly 0 for them and finite everywhere."""
    q, k, v, _, _ = _inputs(t=40, s=40, h=2, g=1)
    ids_q = jnp.tile((jnp.arange(40) % 4)[None], (2, 1))       # id 3 has no keys
    ids_k = jnp.tile((jnp.arange(40) % 3)[None], (2, 1))
    # Queries at 0..39, keys at 8..47: queries 0..7 see nothing by position.
    kw = dict(q_offset=0, kv_offset=8, segment_ids=(ids_q, ids_k))
    fkw = _kernel_kwargs(q, k, kw, SMALL, self.INTERPRET)
    o, lse, grads = _loss_and_grads(lambda q, k, v: flash.flash_attention(q, k, v, **fkw),
                                    q, k, v)
    empty = np.asarray(ids_q == 3) | (np.arange(40) < 8)[None]
    o, lse = np.asarray(o), np.asarray(lse)
    assert np.all(o[empty] == 0) and np.all(np.abs(o[~empty]).sum(-1) > 0)
    assert np.all(lse[empty] == -np.inf) and np.all(np.isfinite(lse[~empty]))
    for x in grads:
      assert np.all(np.isfinite(np.asarray(x)))
    assert np.all(np.asarray(grads[0])[empty] == 0)
    with _ORACLE_PRECISION():
      o_ref, lse_ref, grads_ref = _loss_and_grads(
          lambda q, k, v: attn.blockwise_attention(q, k, v, impl="reference", **kw), q, k, v)
    assert_rel_close(o, o_ref, 1e-5, "o")
    _assert_lse_close(lse, lse_ref, 1e-5)
    assert_trees_rel_close(grads, grads_ref, 1e-5, "grads")


class TestFlashAttentionInterpret(TestFlashAttention):
  INTERPRET = True


# Through seqmix.ops (the dispatch): interpret mode on CPU, compiled on GPU.
@pytest.fixture
def small_pallas_blocks(monkeypatch):
  monkeypatch.setattr(attn, "PALLAS_BLOCK_SIZES", SMALL)


def test_dispatch_traced_offsets_under_jit(small_pallas_blocks):
  """blockwise_attention(impl="pallas") with q_offset / kv_offset traced under jit (as ring
  attention passes them) equals the reference with the same values static, in o, lse and
  gradients; the case has rows that see nothing."""
  del small_pallas_blocks
  q, k, v, _, _ = _inputs(t=24, s=40, h=4, g=2)

  def run(impl):
    def f(q, k, v, qo, ko):
      return attn.blockwise_attention(q, k, v, q_offset=qo, kv_offset=ko, window=30,
                                      impl=impl)
    return f

  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

  def loss(impl):
    def f(q, k, v, qo, ko):
      o, lse = run(impl)(q, k, v, qo, ko)
      return jnp.sum(o * w), (o, lse)
    return jax.value_and_grad(f, (0, 1, 2), has_aux=True)

  (_, (o, lse)), g = _run(loss("pallas"), q, k, v, jnp.int32(10), jnp.int32(20))
  with _ORACLE_PRECISION():
    (_, (o_ref, lse_ref)), g_ref = loss("reference")(q, k, v, 10, 20)
  assert not np.isfinite(np.asarray(lse_ref)).all()
  assert_rel_close(o, o_ref, 1e-5, "o")
  _assert_lse_close(lse, lse_ref, 1e-5)
  assert_trees_rel_close(g, g_ref, 1e-5, "grads")


def test_dispatch_merge_partials_of_two_key_blocks_equals_whole(small_pallas_blocks):
  """Keys split in two blocks (kv_offset), each through the pallas kernel, merged by lse:
  equals attention over all keys, in values and gradients (rows that see nothing of the
  second block have lse₂ = −inf)."""
  del small_pallas_blocks
  q, k, v, ids_q, _ = _inputs(t=63, h=2, g=1)
  cut = 25
  w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)

  def whole(q, k, v):
    o, lse = attn.blockwise_attention(q, k, v, segment_ids=ids_q, window=40, impl="reference")
    return jnp.sum(o * w) + jnp.sum(lse[..., :1]), (o, lse)

  def merged(q, k, v):
    parts = [attn.blockwise_attention(q, k[:, sl], v[:, sl], segment_ids=(ids_q, ids_q[:, sl]),
                                      window=40, q_offset=0, kv_offset=sl.start, impl="pallas")
             for sl in (slice(0, cut), slice(cut, 63))]
    o, lse = attn.merge_partials(*parts[0], *parts[1])
    return jnp.sum(o * w) + jnp.sum(lse[..., :1]), (o, lse)

  (_, (o, lse)), g = _run(jax.value_and_grad(merged, (0, 1, 2), has_aux=True), q, k, v)
  with _ORACLE_PRECISION():
    (_, (o_ref, lse_ref)), g_ref = jax.value_and_grad(whole, (0, 1, 2), has_aux=True)(q, k, v)
  assert_rel_close(o, o_ref, 1e-5, "o")
  assert_rel_close(lse, lse_ref, 1e-5, "lse")
  assert_trees_rel_close(g, g_ref, 1e-5, "grads")


def test_dispatch_attention_matches_reference(small_pallas_blocks):
  """attention(impl="pallas"): packed documents, causal, bf16; o and gradients."""
  del small_pallas_blocks
  q, k, v, ids, _ = _inputs(t=63, h=4, g=2, dtype=jnp.bfloat16)

  def loss(impl):
    def f(q, k, v):
      o = attn.attention(q, k, v, segment_ids=ids, impl=impl)[0]
      return jnp.sum(jnp.sin(o.astype(jnp.float32))), o
    return jax.value_and_grad(f, (0, 1, 2), has_aux=True)

  (_, o), g = _run(loss("pallas"), q, k, v)
  with _ORACLE_PRECISION():
    (_, o_ref), g_ref = loss("reference")(q, k, v)
  assert o.dtype == jnp.bfloat16
  assert_rel_close(o, o_ref, RTOL["bfloat16"], "o")
  assert_trees_rel_close(g, g_ref, RTOL["bfloat16"], "grads")


def test_dispatch_bias_is_a_clear_error():
  q, k, v, _, _ = _inputs(t=8, d=4)
  bias = jnp.zeros((1, 1, 8, 8))
  with pytest.raises(NotImplementedError, match="'reference', 'xla', 'cudnn' or 'chunked'"):
    attn.attention(q, k, v, bias=bias, impl="pallas")
  with pytest.raises(NotImplementedError, match="'reference' or 'chunked'"):
    attn.blockwise_attention(q, k, v, bias=bias, impl="pallas")


def test_bad_arguments():
  q, k, v, ids_q, ids_k = _inputs(t=8, s=12, d=4)
  with pytest.raises(ValueError, match="one dtype"):
    flash.flash_attention(q, k.astype(jnp.bfloat16), v, interpret=True)
  with pytest.raises(ValueError, match="both q_ids and kv_ids"):
    flash.flash_attention(q, k, v, q_ids=ids_q, interpret=True)
  with pytest.raises(ValueError, match=r"q_ids must be \[B,T\]"):
    flash.flash_attention(q, k, v, q_ids=ids_k, kv_ids=ids_k, interpret=True)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    flash.flash_attention(q, k[:, :, :1].repeat(3, 2)[:, :, :3], v[:, :, :1].repeat(3, 2),
                          interpret=True)


# Tile choice (pure arithmetic, no kernel runs).
def test_smem_estimate_is_calibrated_on_the_measured_bf16_defaults():
  """The bf16 K = V = 128 defaults compiled on the H200 (device run 1): the estimate must
  admit them (224 KiB <= 227 KiB) and keep them; float32 at the same tiles needs twice the
  bytes, which is the RESOURCE_EXHAUSTED of the float32 inputs."""
  bl = flash.BlockSizes()
  est = _k.pass_smem(bl, 2, 128, 128, fma=False)
  assert est["fwd"] == 2 * (128 * 128 + 3 * 128 * 256) == 224 * 1024 <= _k.SMEM_BYTES
  assert est["dkv"] == 2 * (64 * 256 + 2 * 64 * 256) + 2 * 64 * 2 * 4
  assert flash.default_block_sizes(jnp.bfloat16, 128, 128) == bl
  assert _k.pass_smem(bl, 4, 128, 128, fma=True)["fwd"] > _k.SMEM_BYTES


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("d", [16, 64, 128, 256])
def test_default_block_sizes_fit_shared_memory(dtype, d):
  """Every pass of the default tiles fits the budget (float32: FMA_SMEM_FRACTION of it),
  tiles stay powers of two >= 16, stages >= 2, and nothing is shrunk that already fit."""
  dtype = jnp.dtype(dtype)
  fma = dtype == jnp.float32
  bl = flash.default_block_sizes(dtype, d, d)
  limit = _k.SMEM_BYTES * (_k.FMA_SMEM_FRACTION if fma else 1.0)
  est = _k.pass_smem(bl, dtype.itemsize, d, d, fma)
  assert all(v <= limit for v in est.values()), (bl, est)
  tiles = [bl.block_q, bl.block_k, bl.block_q_dkv, bl.block_k_dkv, bl.block_q_dq,
           bl.block_k_dq]
  assert all(t >= 16 and t & (t - 1) == 0 for t in tiles)
  assert bl.num_stages >= 2 and bl.num_stages_bwd >= 2
  full = _k.pass_smem(flash.BlockSizes(), dtype.itemsize, d, d, fma)
  if full["fwd"] <= limit:
    assert (bl.block_q, bl.block_k, bl.num_stages) == (128, 128, 3)


def test_fit_block_sizes_shrink_order():
  """float32 K = V = 128: the streamed tile is cut first (to 32), then a stage; the
  resident tiles are kept."""
  bl = flash.default_block_sizes(jnp.float32, 128, 128)
  assert (bl.block_q, bl.block_k, bl.num_stages) == (128, 32, 2)
  assert (bl.block_k_dkv, bl.block_q_dkv) == (64, 32)
  assert (bl.block_q_dq, bl.block_k_dq) == (64, 32)
  # A budget nothing fits returns the smallest tiles instead of looping.
  tiny = _k.fit_block_sizes(flash.BlockSizes(), 4, 128, 128, fma=True, budget=1024)
  assert (tiny.block_q, tiny.block_k, tiny.num_stages) == (16, 16, 2)


# Block skipping (pure index arithmetic): the loop ranges against brute-force visibility.
def _ranges_params(causal, window, t_q, t_k):
  return _k.Params(scale=1.0, causal=causal, window=window, t_q=t_q, t_k=t_k, group=1,
                   segments=False, blocks=flash.BlockSizes(), f32_dots=False, interpret=True)


def _block_visibility(t_q, t_k, tq_p, tk_p, bq, bk, causal, window, shifts):
  """bool [n_shift, nq, nk] (any real pair visible), [n_shift, nq, nk] (every pair visible
  by position, keys < t_k)."""
  sh = np.asarray(shifts)[:, None, None]
  i = np.arange(tq_p)[None, :, None]
  j = np.arange(tk_p)[None, None, :]
  pos = np.ones((len(shifts), tq_p, tk_p), bool)
  if causal:
    pos &= j <= i + sh
  if window is not None:
    pos &= j > i + sh - window
  shape = (len(shifts), tq_p // bq, bq, tk_p // bk, bk)
  real = (pos & (j < t_k) & (i < t_q)).reshape(shape).any(axis=(2, 4))
  full = (pos & (j < t_k)).reshape(shape).all(axis=(2, 4))
  return real, full


def _in_range(ranges, n_shift, n_outer, n_inner):
  """[n_shift, n_outer, n_inner] bool masks of [lo, hi) and [full_lo, full_hi)."""
  lo, flo, fhi, hi = (np.broadcast_to(np.asarray(x), (n_shift, n_outer))[..., None]
                      for x in ranges)
  idx = np.arange(n_inner)[None, None, :]
  return (idx >= lo) & (idx < hi), (idx >= flo) & (idx < fhi)


@pytest.mark.parametrize("t_q,t_k,bq,bk,mult", [(63, 63, 16, 16, 16), (100, 100, 32, 16, 32),
                                               (40, 100, 16, 32, 32), (100, 40, 32, 16, 32)])
def test_block_ranges_are_exact(t_q, t_k, bq, bk, mult):
  """For shifts (q_offset − kv_offset) from −120 to 126, windows below, at and across the
  block size, and ragged (padded) T and S: the forward / dQ key-block range of every query
  block, and the dK/dV query-block range of every key block, hold exactly the blocks with a
  visible (real query, real key) pair — nothing visible is skipped, no empty block is
  visited — and the unmasked interior holds only blocks visible everywhere by position."""
  for causal, window in ((False, None), (True, None), (True, 1), (True, 5), (True, 16),
                         (True, 17), (True, 40)):
    _check_block_ranges(t_q, t_k, bq, bk, mult, causal, window)


def _check_block_ranges(t_q, t_k, bq, bk, mult, causal, window):
  p = _ranges_params(causal, window, t_q, t_k)
  tq_p, tk_p = -(-t_q // mult) * mult, -(-t_k // mult) * mult
  nq, nk = tq_p // bq, tk_p // bk
  shifts = np.arange(-120, 127, 3, dtype=np.int32)
  real, full = _block_visibility(t_q, t_k, tq_p, tk_p, bq, bk, causal, window, shifts)
  qs = jnp.asarray(np.arange(nq, dtype=np.int32) * bq)[None, :]
  ks = jnp.asarray(np.arange(nk, dtype=np.int32) * bk)[None, :]
  sh = jnp.asarray(shifts)[:, None]
  k_rng, k_full = _in_range(_k._key_block_ranges(p, qs, bq, sh, bk, nk, t_k % bk != 0),
                            len(shifts), nq, nk)
  np.testing.assert_array_equal(k_rng, real, err_msg=f"key blocks visited != visible ({causal=}, {window=})")
  assert not np.any(k_full & ~full), "an unmasked key block has an invisible pair"
  q_rng, q_full = _in_range(_k._query_block_ranges(p, ks, bk, sh, bq, nq),
                            len(shifts), nk, nq)
  np.testing.assert_array_equal(q_rng, real.transpose(0, 2, 1),
                                err_msg=f"query blocks visited != visible ({causal=}, {window=})")
  full_t = _block_visibility(t_q, tk_p, tq_p, tk_p, bq, bk, causal, window, shifts)[1]
  assert not np.any(q_full & ~full_t.transpose(0, 2, 1)), "an unmasked query block is masked"


def test_window_visits_few_blocks_at_t16384():
  """The work the skipping leaves at the benchmark shape (T = 16384, W = 512, default
  128-wide forward tiles): the window visits >= 10x fewer (query, key) block pairs than full
  causal, so the >= 3x speed target has room for the per-program fixed costs."""
  t, bl = 16384, flash.BlockSizes()
  counts = {}
  for window in (None, 512):
    p = _ranges_params(True, window, t, t)
    qs = jnp.arange(t // bl.block_q, dtype=jnp.int32) * bl.block_q
    lo, _, _, hi = _k._key_block_ranges(p, qs, bl.block_q, jnp.int32(0), bl.block_k,
                                        t // bl.block_k, False)
    counts[window] = int(np.sum(np.asarray(hi) - np.asarray(lo)))
  assert counts[None] == 128 * 129 // 2
  assert counts[512] == 128 * 5 - (1 + 2 + 3 + 4)
  assert counts[None] >= 10 * counts[512]
