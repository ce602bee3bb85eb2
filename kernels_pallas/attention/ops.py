"""Public entry of the flash attention kernels: shape checks, padding, custom_vjp.

  flash_attention(q, k, v, shift=..., ...) -> (o [B,T,H,V], lse [B,T,H] float32)

The semantics are those of `seqmix.ops.attention.blockwise_attention` without bias (that
module is the only caller). Sequences are padded to block multiples and head dims to a power
of two (>= 16) here, and the padding is masked or sliced away, so any T and head dim work.

Backward (FlashAttention-2): delta = rowsum(dO · O) − dlse is computed first (one fused XLA
pass), then a dK/dV kernel (one program per key block, walking the query blocks that see
it) and a dQ kernel (one program per query block, walking its visible key blocks); both
recompute P = exp(S − lse) from q, k and the saved lse. The lse cotangent enters through
delta: d lse_i / d s_ij = P_ij, so dS = P ⊙ (dP − (delta − dlse)). With grouped heads the
dK/dV kernel writes one slab per query head and the group sum is one XLA reduction.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels_pallas.attention import kernel as _k

BlockSizes = _k.BlockSizes


def _pad_axis(x, axis, size, value=0):
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _round_up(n, m):
  return -(-n // m) * m


def _head_dim(d):
  return max(16, pl.next_power_of_2(d))


def default_block_sizes(dtype, dk, dv):
  """BlockSizes() shrunk to fit the GPU's shared memory for this dtype and (padded) head dims.

  bf16 / f16 with head dims <= 128 keep the measured defaults; float32 (4-byte elements, and
  IEEE dots without tensor cores) and wide heads get smaller tiles (`kernel.fit_block_sizes`).
  """
  dtype = jnp.dtype(dtype)
  return _k.fit_block_sizes(BlockSizes(), dtype.itemsize, dk, dv, fma=dtype == jnp.float32)


def flash_attention(q, k, v, *, shift=None, causal=True, scale=None, window=None,
                    q_ids=None, kv_ids=None, block_sizes=None, interpret=False):
  """Flash attention with lse.  q [B,T,H,K], k [B,S,G,K], v [B,S,G,V] -> (o, lse).

  Args:
    q, k, v: H % G == 0; query head i reads key/value head i // (H/G).
    shift: q_offset − kv_offset (int or traced int32 scalar): query i at relative position
      i + shift, key j at j. Default S − T (the queries are the end of the keys).
    causal, window: keys j <= i + shift, and j > i + shift − window when window is set.
    scale: logit scale (default K ** -0.5).
    q_ids, kv_ids: int [B,T] and [B,S] segment ids (both or neither); equal ids attend.
    block_sizes: a BlockSizes, used as given (shrunk only for short sequences); default
      `default_block_sizes(q.dtype, ...)`, which fits the tiles to shared memory.
    interpret: run the kernels in the Pallas interpreter (CPU tests).
  Returns:
    o [B,T,H,V] in v's dtype; lse [B,T,H] float32 (−inf, with o = 0, for rows that see no
    key).
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"flash_attention: q, k, v must be [B,T,H,D]; got {q.shape=}, "
                     f"{k.shape=}, {v.shape=}.")
  b, t, h, dk = q.shape
  s, g = k.shape[1], k.shape[2]
  if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[3] != dk:
    raise ValueError(f"flash_attention: k must be [B,S,G,K] and v [B,S,G,V]; got {q.shape=}, "
                     f"{k.shape=}, {v.shape=}.")
  if h % g:
    raise ValueError(f"flash_attention: query heads {h} must be a multiple of kv heads {g}; "
                     f"got {q.shape=}, {k.shape=}.")
  if window is not None and not causal:
    raise ValueError(f"flash_attention: window={window} needs causal=True.")
  if (q_ids is None) != (kv_ids is None):
    raise ValueError("flash_attention: pass both q_ids and kv_ids, or neither.")
  if q_ids is not None and (q_ids.shape != (b, t) or kv_ids.shape != (b, s)):
    raise ValueError(f"flash_attention: q_ids must be [B,T]={(b, t)} and kv_ids [B,S]="
                     f"{(b, s)}; got {q_ids.shape=}, {kv_ids.shape=}.")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"flash_attention: q, k, v must share one dtype; got {q.dtype}, "
                     f"{k.dtype}, {v.dtype}. Cast them first.")
  dv = v.shape[3]
  dk_p, dv_p = _head_dim(dk), _head_dim(dv)
  blocks = block_sizes or default_block_sizes(q.dtype, dk_p, dv_p)
  blocks = blocks.clamp(t, s)
  t_p, s_p = _round_up(t, blocks.q_multiple), _round_up(s, blocks.k_multiple)
  qp = _pad_axis(_pad_axis(q, 1, t_p), 3, dk_p)                 # [b, t_p, h, dk_p]
  kp = _pad_axis(_pad_axis(k, 1, s_p), 3, dk_p)                 # [b, s_p, g, dk_p]
  vp = _pad_axis(_pad_axis(v, 1, s_p), 3, dv_p)                 # [b, s_p, g, dv_p]
  seg = None
  if q_ids is not None:
    # Padded rows get ids no real row has; padded keys are also masked by index.
    seg = (_pad_axis(q_ids.astype(jnp.int32), 1, t_p, -1),
           _pad_axis(kv_ids.astype(jnp.int32), 1, s_p, -2))
  shift = jnp.asarray(s - t if shift is None else shift, jnp.int32).reshape(())
  p = _k.Params(scale=float(dk ** -0.5 if scale is None else scale), causal=bool(causal),
                window=None if window is None else int(window), t_q=t, t_k=s, group=h // g,
                segments=seg is not None, blocks=blocks, f32_dots=q.dtype == jnp.float32,
                interpret=bool(interpret))
  o, lse = _flash(qp, kp, vp, shift, seg, p)
  o = o[:, :t, :, :dv]                                          # [b, t, h, v]
  lse = jnp.swapaxes(lse, 1, 2)[:, :t]                          # [b, h, t_p] -> [b, t, h]
  return o, lse


def _compiler_params(p, backward):
  if p.interpret:
    return None
  from jax.experimental.pallas import triton as plgpu   # GPU only; not needed to interpret
  bl = p.blocks
  warps = bl.num_warps_bwd if backward else bl.num_warps
  return plgpu.CompilerParams(num_warps=warps,
                              num_stages=bl.num_stages_bwd if backward else bl.num_stages)


def _default_warps(p, d):
  """Params with unset warp counts filled in: 4 for head dims <= 64, else 8 (the dK/dV pass
  holds two [block_k_dkv, d] float32 accumulators in registers)."""
  bl = p.blocks
  if bl.num_warps is None or bl.num_warps_bwd is None:
    bl = dataclasses.replace(bl, num_warps=bl.num_warps or (4 if d <= 64 else 8),
                             num_warps_bwd=bl.num_warps_bwd or (4 if d <= 64 else 8))
    p = dataclasses.replace(p, blocks=bl)
  return p


_SCALAR = pl.BlockSpec((), lambda *_: ())


def _kv_head(h, group):
  return jax.lax.div(h, np.int32(group)) if group > 1 else h


def _forward(q, k, v, shift, seg, p):
  """-> (o [B,T_p,H,V_p] in v's dtype, lse [B,H,T_p] float32)."""
  p = _default_warps(p, q.shape[-1])
  b, t_p, h, d = q.shape
  s_p, dv = k.shape[1], v.shape[3]
  bq = p.blocks.block_q
  kvh = functools.partial(_kv_head, group=p.group)
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)),
      pl.BlockSpec((None, s_p, None, d), lambda i, b_, h_: (b_, 0, kvh(h_), 0)),
      pl.BlockSpec((None, s_p, None, dv), lambda i, b_, h_: (b_, 0, kvh(h_), 0)),
      _SCALAR,
  ]
  args = [q, k, v, shift]
  if seg is not None:
    in_specs += [pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, i)),
                 pl.BlockSpec((None, s_p), lambda i, b_, h_: (b_, 0))]
    args += list(seg)
  return pl.pallas_call(
      functools.partial(_k.forward_kernel, p=p),
      grid=(t_p // bq, b, h),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, dv), lambda i, b_, h_: (b_, i, h_, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i))],
      out_shape=[jax.ShapeDtypeStruct((b, t_p, h, dv), v.dtype),
                 jax.ShapeDtypeStruct((b, h, t_p), jnp.float32)],
      compiler_params=_compiler_params(p, backward=False),
      interpret=p.interpret,
      name="seqmix_flash_fwd",
  )(*args)


def _backward(q, k, v, shift, seg, o, lse, do, dlse, p):
  """-> (dq, dk, dv) for the padded operands."""
  p = _default_warps(p, q.shape[-1])
  b, t_p, h, d = q.shape
  s_p, g, dv = k.shape[1], k.shape[2], v.shape[3]
  bl = p.blocks
  kvh = functools.partial(_kv_head, group=p.group)
  delta = jnp.einsum("bthv,bthv->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  dlt = delta - dlse.astype(jnp.float32)                              # [b, h, t_p]
  lse2 = jnp.where(jnp.isneginf(lse), jnp.inf, lse * _k.LOG2E)        # [b, h, t_p]

  bk = bl.block_k_dkv
  in_specs = [
      pl.BlockSpec((None, t_p, None, d), lambda j, b_, h_: (b_, 0, h_, 0)),
      pl.BlockSpec((None, bk, None, d), lambda j, b_, h_: (b_, j, kvh(h_), 0)),
      pl.BlockSpec((None, bk, None, dv), lambda j, b_, h_: (b_, j, kvh(h_), 0)),
      _SCALAR,
      pl.BlockSpec((None, t_p, None, dv), lambda j, b_, h_: (b_, 0, h_, 0)),
      pl.BlockSpec((None, None, t_p), lambda j, b_, h_: (b_, h_, 0)),
      pl.BlockSpec((None, None, t_p), lambda j, b_, h_: (b_, h_, 0)),
  ]
  args = [q, k, v, shift, do, lse2, dlt]
  if seg is not None:
    in_specs += [pl.BlockSpec((None, t_p), lambda j, b_, h_: (b_, 0)),
                 pl.BlockSpec((None, bk), lambda j, b_, h_: (b_, j))]
    args += list(seg)
  # Grouped heads: one float32 slab per query head, summed over the group below.
  slab = k.dtype if p.group == 1 else jnp.float32
  out_specs = [pl.BlockSpec((None, bk, None, d), lambda j, b_, h_: (b_, j, h_, 0)),
               pl.BlockSpec((None, bk, None, dv), lambda j, b_, h_: (b_, j, h_, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, s_p, h, d), slab),
               jax.ShapeDtypeStruct((b, s_p, h, dv), slab)]
  aliases = {}
  if bl.dq_atomic:
    # Every key block of one (b, h) adds into that head's whole [t_p, d] dQ slab.
    dq_spec = pl.BlockSpec((None, t_p, None, d), lambda j, b_, h_: (b_, 0, h_, 0))
    in_specs.append(dq_spec)
    out_specs.append(dq_spec)
    out_shape.append(jax.ShapeDtypeStruct((b, t_p, h, d), jnp.float32))
    aliases = {len(args): 2}
    args.append(jnp.zeros((b, t_p, h, d), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_k.dkv_kernel, p=p),
      grid=(s_p // bk, b, h),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=_compiler_params(p, backward=True),
      interpret=p.interpret,
      name="seqmix_flash_dkv",
  )(*args)
  dk, dvv = outs[:2]
  if p.group > 1:
    dk = dk.reshape(b, s_p, g, p.group, d).sum(3).astype(k.dtype)     # [b, s_p, g, d]
    dvv = dvv.reshape(b, s_p, g, p.group, dv).sum(3).astype(v.dtype)  # [b, s_p, g, dv]
  if bl.dq_atomic:
    return (outs[2] * p.scale).astype(q.dtype), dk, dvv

  bq = bl.block_q_dq
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)),
      pl.BlockSpec((None, s_p, None, d), lambda i, b_, h_: (b_, 0, kvh(h_), 0)),
      pl.BlockSpec((None, s_p, None, dv), lambda i, b_, h_: (b_, 0, kvh(h_), 0)),
      _SCALAR,
      pl.BlockSpec((None, bq, None, dv), lambda i, b_, h_: (b_, i, h_, 0)),
      pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i)),
      pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i)),
  ]
  args = [q, k, v, shift, do, lse2, dlt]
  if seg is not None:
    in_specs += [pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, i)),
                 pl.BlockSpec((None, s_p), lambda i, b_, h_: (b_, 0))]
    args += list(seg)
  dq = pl.pallas_call(
      functools.partial(_k.dq_kernel, p=p),
      grid=(t_p // bq, b, h),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(p, backward=True),
      interpret=p.interpret,
      name="seqmix_flash_dq",
  )(*args)
  return dq, dk, dvv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, shift, seg, p):
  return _forward(q, k, v, shift, seg, p)


def _flash_fwd(q, k, v, shift, seg, p):
  o, lse = _forward(q, k, v, shift, seg, p)
  return (o, lse), (q, k, v, shift, seg, o, lse)


def _flash_bwd(p, res, cts):
  q, k, v, shift, seg, o, lse = res
  do, dlse = cts
  dq, dk, dv = _backward(q, k, v, shift, seg, o, lse, do, dlse, p)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
