"""Flash attention kernel bodies (forward, dK/dV pass, dQ pass) and their static parameters.

Each body sees one (batch, head) pair and one block of queries (forward, dQ) or keys (dK/dV);
the other sequence is a whole-sequence ref walked in blocks by `lax.fori_loop`. The same
bodies run compiled (the Triton lowering on GPU) and in interpret mode (CPU tests).

Positions. Only the difference of the two offsets matters: with `shift = q_offset − kv_offset`
(a traced int32 scalar operand, so ring attention can compute it from the device index),
query row `i` and key row `j` (local indices) are in causal order when `j <= i + shift`, and
inside a window W when `j > i + shift − W`. The loop over the other sequence is cut to the
blocks that hold a visible pair (causal and window skipping) and split in three ranges: the
two edges, where the position mask is built, and the interior, where every pair is visible
by position and no position mask is built.

Numerics. Logits are carried in base 2 (`s · scale · log2 e`, `exp2`), accumulation is
float32, and the running max is replaced by 0 while a row has seen nothing, so masked
entries are exact zeros (`exp2(−inf)`) and an empty row ends with l = 0 → o = 0,
lse = −inf. The backward passes take lse in base 2 with −inf replaced by +inf, so every
probability of an empty row is `exp2(s − inf) = 0` and its gradients are exact zeros.
"""

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two, >= 16 for the GPU's matmul units).

  block_q, block_k: query rows per program and keys per loop step of the forward pass.
  block_q_dkv, block_k_dkv: keys per program (block_k_dkv) and queries per step of the
    dK/dV pass. block_q_dq, block_k_dq: queries per program and keys per step of the dQ pass.
  num_warps, num_stages: Triton launch parameters (None: chosen from the head dim).
  """
  # Defaults: the fastest of the variants timed on the H200 (2026-12-03, B=8 T=4096 H=16
  # D=128 bf16 causal; experiments/bench/kernels_attention.py): 128x128 forward tiles, 64x64
  # backward tiles with 4 warps (fwd+bwd 5.72 ms vs 7.07 ms with 32x128 / 128x32 and 8).
  block_q: int = 128
  block_k: int = 128
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  num_warps: int | None = None
  num_stages: int = 3
  num_warps_bwd: int | None = 4
  num_stages_bwd: int = 2
  # dq_atomic: the dK/dV pass also computes dQ (dS·K per visited block) and adds it into a
  # float32 buffer with atomic adds, as FlashAttention-2 does; the dQ pass is not run. The
  # backward then does 5 block matmuls per visible block pair instead of 7 (the dQ pass
  # recomputes S and dP), at the price of T·K float32 atomics per visited block. Off by
  # default until the device run times it (the atomics are acquire-release in the Triton
  # lowering; their cost is the unknown).
  dq_atomic: bool = False

  def clamp(self, t_q, t_k):
    """The sizes shrunk to cover short sequences (min 16, next power of two of T)."""
    cq = max(16, pl.next_power_of_2(max(1, t_q)))
    ck = max(16, pl.next_power_of_2(max(1, t_k)))
    return dataclasses.replace(
        self, block_q=min(self.block_q, cq), block_k=min(self.block_k, ck),
        block_q_dkv=min(self.block_q_dkv, cq), block_k_dkv=min(self.block_k_dkv, ck),
        block_q_dq=min(self.block_q_dq, cq), block_k_dq=min(self.block_k_dq, ck))

  @property
  def q_multiple(self):
    return max(self.block_q, self.block_q_dkv, self.block_q_dq)

  @property
  def k_multiple(self):
    return max(self.block_k, self.block_k_dkv, self.block_k_dq)


# Shared memory one thread block may use on Hopper (H100 / H200: 227 KiB of the 228 KiB per SM).
SMEM_BYTES = 227 * 1024
# Fraction of SMEM_BYTES the float32 (IEEE, FMA) kernels may fill by the estimate below: their
# dots stage operands through shared memory for layout conversions the estimate does not count.
FMA_SMEM_FRACTION = 0.75


def smem_bytes(resident, streamed, d_res, d_str, itemsize, stages, rows_f32=0, fma_tiles=0):
  """Predicted shared memory (bytes) of one program of a Triton-lowered flash pass.

  The program keeps `resident` rows of width `d_res` (e.g. the q tile of the forward) in one
  buffer and streams `streamed` rows of width `d_str` per loop step (k and v: d_str = K + V)
  through `stages` buffers (the software pipeline), plus `rows_f32` float32 values per
  streamed row (lse and delta in the backward). fma_tiles: [resident, streamed] float32 tiles
  staged through shared memory when the dots run without tensor cores (float32 IEEE).

  Calibration (device run 1, H200, bf16, K = V = 128): the forward with 128x128 tiles and 3
  stages compiled and ran; this estimate gives it 224 KiB <= 227 KiB. The rule of thumb
  (block_q·D + 2·block_k·D)·bytes·stages would give 288 KiB, i.e. it would have refused a
  configuration that works: the q tile is loaded once, outside the pipelined loop.
  """
  return (itemsize * (resident * d_res + stages * streamed * d_str)
          + stages * streamed * rows_f32 * 4 + fma_tiles * resident * streamed * 4)


def pass_smem(blocks, itemsize, dk, dv, fma):
  """{"fwd" | "dkv" | "dq": predicted shared memory bytes} of `blocks` (padded head dims)."""
  b = blocks
  return {
      # q resident; k and v streamed.
      "fwd": smem_bytes(b.block_q, b.block_k, dk, dk + dv, itemsize, b.num_stages,
                        fma_tiles=int(fma)),
      # k and v resident; q, dO, lse and delta streamed; Pᵀ and dSᵀ tiles when FMA.
      "dkv": smem_bytes(b.block_k_dkv, b.block_q_dkv, dk + dv, dk + dv, itemsize,
                        b.num_stages_bwd, rows_f32=2, fma_tiles=2 * int(fma)),
      # q, dO, lse and delta resident; k and v streamed; P and dS tiles when FMA.
      "dq": smem_bytes(b.block_q_dq, b.block_k_dq, dk + dv, dk + dv, itemsize,
                       b.num_stages_bwd, fma_tiles=2 * int(fma)),
  }


def fit_block_sizes(blocks, itemsize, dk, dv, fma, budget=SMEM_BYTES):
  """`blocks` shrunk until every pass's `pass_smem` estimate fits the shared memory budget.

  Each pass gives up, in order: its streamed tile down to 32 rows, then a pipeline stage
  (down to 2), then its resident tile, then the streamed tile down to 16 — the streamed
  tile is multiplied by `stages` in the estimate, so it is the cheapest to cut. Tiles that
  already fit are returned unchanged (bf16 with K = V = 128 keeps the measured defaults).
  With fma (float32 IEEE dots) the budget is FMA_SMEM_FRACTION of `budget`. If nothing fits
  (a very wide head dim), the smallest configuration is returned and the compiler decides.

  Args:
    blocks: a BlockSizes.
    itemsize: bytes per element of q, k, v (2 for bf16, 4 for f32).
    dk, dv: padded key / value head dims.
    fma: float32 inputs with IEEE dots.
    budget: bytes of shared memory per program.
  Returns:
    A BlockSizes.
  """
  limit = int(budget * (FMA_SMEM_FRACTION if fma else 1.0))
  fields = {"fwd": ("block_q", "block_k", "num_stages"),
            "dkv": ("block_k_dkv", "block_q_dkv", "num_stages_bwd"),
            "dq": ("block_q_dq", "block_k_dq", "num_stages_bwd")}
  for name, (res, strm, stg) in fields.items():
    while pass_smem(blocks, itemsize, dk, dv, fma)[name] > limit:
      r, s, n = getattr(blocks, res), getattr(blocks, strm), getattr(blocks, stg)
      if s > 32:
        change = {strm: s // 2}
      elif n > 2:
        change = {stg: n - 1}
      elif r > 16:
        change = {res: r // 2}
      elif s > 16:
        change = {strm: s // 2}
      else:
        break
      blocks = dataclasses.replace(blocks, **change)
  return blocks


@dataclasses.dataclass(frozen=True)
class Params:
  """Static description of one call (hashable: it is a nondiff argument of the custom_vjp).

  t_q, t_k: true sequence lengths (the arrays are padded to block multiples beyond them).
  group: query heads per key/value head (H / G).
  segments: whether segment-id operands are passed.
  f32_dots: run the matmuls in full float32 (IEEE) precision; set for float32 inputs, where
    the GPU default (TF32) would miss the float32 tolerance.
  """
  scale: float
  causal: bool
  window: int | None
  t_q: int
  t_k: int
  group: int
  segments: bool
  blocks: BlockSizes
  f32_dots: bool
  interpret: bool

  @property
  def precision(self):
    return lax.Precision.HIGHEST if self.f32_dots else None


def _dot(a, b, trans_b=False, precision=None):
  """a [m, k] · b [k, n] (or bᵀ with b [n, k]) -> [m, n] float32 (a Triton `tl.dot`)."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _cdiv0(x, d):
  """ceil(x / d) for a traced int32 x clamped below at 0 (d a static positive int)."""
  return lax.div(jnp.maximum(x, 0) + np.int32(d - 1), np.int32(d))


def _fdiv0(x, d):
  """floor(x / d) for a traced int32 x clamped below at 0."""
  return lax.div(jnp.maximum(x, 0), np.int32(d))


def _clip(x, lo, hi):
  return jnp.minimum(jnp.maximum(x, lo), hi)


def _key_block_ranges(p, qs, bq, shift, bk, nk, pad_keys):
  """Key blocks for the query rows [qs, qs + bq): (lo, full_lo, full_hi, hi).

  Blocks [lo, hi) are exactly those holding a visible pair of a real query (row < t_q) and a
  real key (< t_k); [full_lo, full_hi) are visible for every pair by position (and are not
  padding), so they need no position mask.
  """
  nk = min(nk, -(-p.t_k // bk))                             # blocks of padding only: skipped
  q_end = jnp.minimum(qs + bq, p.t_q)                       # padded query rows need no keys
  if p.causal:
    hi = jnp.minimum(_cdiv0(q_end + shift, bk), nk)         # keys j <= q_end − 1 + shift
    full_hi = _fdiv0(qs + shift + 1, bk)                    # whole block j <= qs + shift
  else:
    hi = jnp.int32(nk)
    full_hi = jnp.int32(nk)
  if p.window is not None:
    first = qs + shift - p.window + 1                       # j > qs + shift − W
    lo = jnp.minimum(_fdiv0(first, bk), hi)
    hi = jnp.where(first >= p.t_k, lo, hi)                  # the window starts past the keys
    full_lo = _cdiv0(qs + bq + shift - p.window, bk)        # whole block j > qs+bq−1+shift−W
  else:
    lo = jnp.int32(0)
    full_lo = jnp.int32(0)
  hi = jnp.where(qs >= p.t_q, lo, hi)                       # a block of padded queries only
  if pad_keys:
    full_hi = jnp.minimum(full_hi, p.t_k // bk)             # the ragged last block is masked
  full_lo = _clip(full_lo, lo, hi)
  full_hi = _clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def _query_block_ranges(p, ks, bk, shift, bq, nq):
  """Query blocks for the key rows [ks, ks + bk): (lo, full_lo, full_hi, hi), as above
  (padded query rows, and padded keys, need nothing: their dO is 0, their dK/dV rows are
  sliced away)."""
  nq = min(nq, -(-p.t_q // bq))
  k_last = jnp.minimum(ks + bk, p.t_k) - 1                  # the last real key of the block
  if p.causal:
    lo = jnp.minimum(_fdiv0(ks - shift, bq), nq)            # i >= ks − shift
    full_lo = _cdiv0(ks + bk - 1 - shift, bq)               # whole block i >= ks+bk−1−shift
  else:
    lo = jnp.int32(0)
    full_lo = jnp.int32(0)
  if p.window is not None:
    hi = jnp.minimum(_cdiv0(k_last - shift + p.window, bq), nq)   # i < k_last − shift + W
    full_hi = _fdiv0(ks - shift + p.window, bq)             # whole block i < ks − shift + W
  else:
    hi = jnp.int32(nq)
    full_hi = jnp.int32(nq)
  hi = jnp.maximum(hi, lo)
  if p.causal:
    hi = jnp.where(ks - shift >= p.t_q, lo, hi)             # the key comes after every query
  hi = jnp.where(ks >= p.t_k, lo, hi)                       # a block of padded keys only
  full_lo = _clip(full_lo, lo, hi)
  full_hi = _clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def _mask(p, q_idx, k_idx, shift, q_ids, k_ids, positional, pad_keys, transposed=False):
  """bool [len(q_idx), len(k_idx)] visibility ([len(k_idx), len(q_idx)] when transposed), or
  None when everything is visible."""
  if transposed:
    qi, kj = q_idx[None, :], k_idx[:, None]
    qd, kd = (None if q_ids is None else q_ids[None, :]), (None if k_ids is None else
                                                           k_ids[:, None])
  else:
    qi, kj = q_idx[:, None], k_idx[None, :]
    qd, kd = (None if q_ids is None else q_ids[:, None]), (None if k_ids is None else
                                                           k_ids[None, :])
  m = None

  def both(a, b):
    return b if a is None else a & b

  if positional:
    if p.causal:
      m = both(m, kj <= qi + shift)
    if p.window is not None:
      m = both(m, kj > qi + (shift - p.window))
    if pad_keys:
      m = both(m, kj < p.t_k)
  if qd is not None:
    m = both(m, qd == kd)
  if m is not None:
    m = jnp.broadcast_to(m, jnp.broadcast_shapes(qi.shape, kj.shape))
  return m


def _three_loops(body, ranges, carry):
  """Run body(step, carry, masked) over the edge, interior and edge ranges."""
  lo, full_lo, full_hi, hi = ranges
  carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _split_refs(refs, p, n_in, n_out):
  """(inputs without segment ids, q_ids ref, kv_ids ref, outputs)."""
  ins, outs = refs[:len(refs) - n_out], refs[len(refs) - n_out:]
  if p.segments:
    return ins[:n_in], ins[n_in], ins[n_in + 1], outs
  return ins[:n_in], None, None, outs


def forward_kernel(*refs, p: Params):
  """One block of queries of one (batch, head).

  refs: q [bq, K], k [Tk, K], v [Tk, V], shift [] int32, (q_ids [bq], kv_ids [Tk]),
        outputs o [bq, V], lse [bq] (natural log, −inf for empty rows).
  """
  (q_ref, k_ref, v_ref, shift_ref), qid_ref, kid_ref, (o_ref, lse_ref) = _split_refs(
      refs, p, 4, 2)
  bq, bk = p.blocks.block_q, p.blocks.block_k
  nk = k_ref.shape[0] // bk
  pad_keys = p.t_k % bk != 0
  qs = pl.program_id(0) * bq
  shift = shift_ref[()]
  q = q_ref[...]
  q_idx = qs + jnp.arange(bq, dtype=jnp.int32)
  q_ids = None if qid_ref is None else qid_ref[...]
  c = p.scale * LOG2E

  def body(kb, carry, masked):
    acc, m, l = carry
    ks = kb * bk
    k = k_ref[pl.ds(ks, bk), :]
    v = v_ref[pl.ds(ks, bk), :]
    s = _dot(q, k, trans_b=True, precision=p.precision) * c     # [bq, bk] base-2 logits
    k_ids = None if kid_ref is None else kid_ref[pl.ds(ks, bk)]
    mask = _mask(p, q_idx, ks + jnp.arange(bk, dtype=jnp.int32), shift, q_ids, k_ids,
                 masked, pad_keys)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)                   # 0 while the row has seen nothing
    pr = jnp.exp2(s - m_safe[:, None])
    l = alpha * l + jnp.sum(pr, axis=1)
    acc = alpha[:, None] * acc + _dot(pr.astype(v.dtype), v, precision=p.precision)
    return acc, m_new, l

  carry = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
           jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l = _three_loops(body, _key_block_ranges(p, qs, bq, shift, bk, nk, pad_keys), carry)
  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  m_safe = jnp.where(seen, m, 0.0)
  lse_ref[...] = jnp.where(seen, (m_safe + jnp.log2(l_safe)) * LN2, -jnp.inf)


def dkv_kernel(*refs, p: Params):
  """dK, dV of one block of keys of one (batch, query head).

  refs: q [Tq, K], k [bk, K], v [bk, V], shift [], do [Tq, V], lse2 [Tq] (base 2, +inf for
        empty rows), dlt [Tq] (rowsum(dO·O) − dlse), (q_ids [Tq], kv_ids [bk]),
        outputs dk [bk, K], dv [bk, V].
  """
  atomic = p.blocks.dq_atomic
  if atomic:   # the aliased float32 dQ accumulator [Tq, K]: last input and last output
    refs, dq_ref = refs[:-4] + refs[-3:-1], refs[-1]
  ins, qid_ref, kid_ref, (dk_ref, dv_ref) = _split_refs(refs, p, 7, 2)
  q_ref, k_ref, v_ref, shift_ref, do_ref, lse_ref, dlt_ref = ins
  bq, bk = p.blocks.block_q_dkv, p.blocks.block_k_dkv
  nq = q_ref.shape[0] // bq
  ks = pl.program_id(0) * bk
  shift = shift_ref[()]
  k = k_ref[...]
  v = v_ref[...]
  k_idx = ks + jnp.arange(bk, dtype=jnp.int32)
  k_ids = None if kid_ref is None else kid_ref[...]
  c = p.scale * LOG2E

  def body(qb, carry, masked):
    dk, dv = carry
    qs = qb * bq
    q = q_ref[pl.ds(qs, bq), :]
    do = do_ref[pl.ds(qs, bq), :]
    lse2 = lse_ref[pl.ds(qs, bq)]
    dlt = dlt_ref[pl.ds(qs, bq)]
    st = _dot(k, q, trans_b=True, precision=p.precision) * c     # [bk, bq] = logitsᵀ
    q_ids = None if qid_ref is None else qid_ref[pl.ds(qs, bq)]
    # Padded keys need no mask here: their dK/dV rows are sliced away.
    mask = _mask(p, qs + jnp.arange(bq, dtype=jnp.int32), k_idx, shift, q_ids, k_ids,
                 masked, False, transposed=True)
    if mask is not None:
      st = jnp.where(mask, st, -jnp.inf)
    pt = jnp.exp2(st - lse2[None, :])                                 # Pᵀ
    dv = dv + _dot(pt.astype(do.dtype), do, precision=p.precision)
    dpt = _dot(v, do, trans_b=True, precision=p.precision)         # (dO Vᵀ)ᵀ
    dst = pt * (dpt - dlt[None, :])
    ds_lo = dst.astype(q.dtype)
    dk = dk + _dot(ds_lo, q, precision=p.precision)
    if atomic:
      # dQ rows of this query block: dS · K = (dSᵀ)ᵀ · K, [bq, K]; scaled after the pass.
      dq_blk = lax.dot_general(ds_lo, k, (((0,), (0,)), ((), ())), precision=p.precision,
                               preferred_element_type=jnp.float32)
      _atomic_add(dq_ref, qs, bq, dq_blk)
    return dk, dv

  carry = (jnp.zeros((bk, k_ref.shape[-1]), jnp.float32),
           jnp.zeros((bk, v_ref.shape[-1]), jnp.float32))
  dk, dv = _three_loops(body, _query_block_ranges(p, ks, bk, shift, bq, nq), carry)
  dk_ref[...] = (dk * p.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _atomic_add(ref, start, size, val):
  """ref[start:start + size, :] += val, atomically (the Triton `atomic_add`; the interpreter
  runs programs one after another, where it is a plain add)."""
  from jax.experimental.pallas import triton as plgpu   # the primitive also interprets
  plgpu.atomic_add(ref, (pl.ds(start, size), slice(None)), val)


def dq_kernel(*refs, p: Params):
  """dQ of one block of queries of one (batch, head).

  refs: q [bq, K], k [Tk, K], v [Tk, V], shift [], do [bq, V], lse2 [bq], dlt [bq],
        (q_ids [bq], kv_ids [Tk]), output dq [bq, K].
  """
  ins, qid_ref, kid_ref, (dq_ref,) = _split_refs(refs, p, 7, 1)
  q_ref, k_ref, v_ref, shift_ref, do_ref, lse_ref, dlt_ref = ins
  bq, bk = p.blocks.block_q_dq, p.blocks.block_k_dq
  nk = k_ref.shape[0] // bk
  pad_keys = p.t_k % bk != 0
  qs = pl.program_id(0) * bq
  shift = shift_ref[()]
  q = q_ref[...]
  do = do_ref[...]
  lse2 = lse_ref[...]
  dlt = dlt_ref[...]
  q_idx = qs + jnp.arange(bq, dtype=jnp.int32)
  q_ids = None if qid_ref is None else qid_ref[...]
  c = p.scale * LOG2E

  def body(kb, dq, masked):
    ks = kb * bk
    k = k_ref[pl.ds(ks, bk), :]
    v = v_ref[pl.ds(ks, bk), :]
    s = _dot(q, k, trans_b=True, precision=p.precision) * c
    k_ids = None if kid_ref is None else kid_ref[pl.ds(ks, bk)]
    mask = _mask(p, q_idx, ks + jnp.arange(bk, dtype=jnp.int32), shift, q_ids, k_ids,
                 masked, pad_keys)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    pr = jnp.exp2(s - lse2[:, None])
    dp = _dot(do, v, trans_b=True, precision=p.precision)
    ds = pr * (dp - dlt[:, None])
    return dq + _dot(ds.astype(k.dtype), k, precision=p.precision)

  dq = _three_loops(body, _key_block_ranges(p, qs, bq, shift, bk, nk, pad_keys),
                    jnp.zeros((bq, q_ref.shape[-1]), jnp.float32))
  dq_ref[...] = (dq * p.scale).astype(dq_ref.dtype)
