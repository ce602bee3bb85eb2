"""The ops as mixers call them: single-device, or sequence-parallel under `context`.

Each function takes exactly the arguments of the op it is named after and returns what that
op returns. With no active `seqmix.parallel.context.sequence_parallel` block it IS that op
call (a Python branch at trace time, nothing in the compiled program). Inside one it calls the
shard_map'd form: `sequence_parallel.*` for the recurrent ops and the short convolution,
`ring_attention.context_parallel_attention` for softmax attention.

The batch and head dims are sharded inside the shard_map as the rules say when they divide
the mesh axes, else replicated there (a correct, slower fallback).
"""

from seqmix.ops import attention as _attention
from seqmix.ops import conv as _conv
from seqmix.ops import delta_rule as _delta
from seqmix.ops import linear_attention as _la
from seqmix.ops import mlstm as _mlstm
from seqmix.ops import scan as _scan
from seqmix.ops import ssm as _ssm
from seqmix.parallel import context
from seqmix.parallel import ring_attention
from seqmix.parallel import sequence_parallel as sp


def _common(ctx, batch, *heads):
  kw = dict(mesh=ctx.mesh, axis_name=ctx.axis_name, batch_axes=ctx.batch_spec(batch))
  if heads:
    kw["head_axes"] = ctx.head_spec(*heads)
  return kw


def gla(q, k, v, g=None, **kwargs):
  """`seqmix.ops.linear_attention.gla`."""
  ctx = context.active()
  if ctx is None:
    return _la.gla(q, k, v, g, **kwargs)
  return sp.gla(q, k, v, g, **kwargs, **_common(ctx, q.shape[0], q.shape[2], v.shape[2]))


def rwkv6(r, k, v, w, u, **kwargs):
  """`seqmix.ops.linear_attention.rwkv6`."""
  ctx = context.active()
  if ctx is None:
    return _la.rwkv6(r, k, v, w, u, **kwargs)
  return sp.rwkv6(r, k, v, w, u, **kwargs, **_common(ctx, r.shape[0], r.shape[2]))


def delta_rule(q, k, v, beta, g=None, **kwargs):
  """`seqmix.ops.delta_rule.delta_rule`."""
  ctx = context.active()
  if ctx is None:
    return _delta.delta_rule(q, k, v, beta, g, **kwargs)
  return sp.delta_rule(q, k, v, beta, g, **kwargs,
                       **_common(ctx, q.shape[0], q.shape[2], v.shape[2]))


def linear_scan(a, x, **kwargs):
  """`seqmix.ops.scan.linear_scan`."""
  ctx = context.active()
  if ctx is None:
    return _scan.linear_scan(a, x, **kwargs)
  return sp.linear_scan(a, x, **kwargs, **_common(ctx, max(a.shape[0], x.shape[0])))


def selective_scan(u, delta, A, B, C, D=None, **kwargs):
  """`seqmix.ops.ssm.selective_scan`."""
  ctx = context.active()
  if ctx is None:
    return _ssm.selective_scan(u, delta, A, B, C, D, **kwargs)
  return sp.selective_scan(u, delta, A, B, C, D, **kwargs, **_common(ctx, u.shape[0]))


def causal_conv(u, k, **kwargs):
  """`seqmix.ops.conv.causal_conv`."""
  ctx = context.active()
  if ctx is None:
    return _conv.causal_conv(u, k, **kwargs)
  return sp.causal_conv(u, k, **kwargs, **_common(ctx, u.shape[0]))


def mlstm(q, k, v, i, f, **kwargs):
  """`seqmix.ops.mlstm.mlstm`."""
  ctx = context.active()
  if ctx is None:
    return _mlstm.mlstm(q, k, v, i, f, **kwargs)
  return sp.mlstm(q, k, v, i, f, **kwargs, **_common(ctx, q.shape[0], q.shape[2]))


# blockwise_attention impls the ring runs per block, for an `attention` impl name.
_BLOCK_IMPL = {"auto": "chunked", "chunked": "chunked", "reference": "reference",
               "pallas": "pallas"}


def attention(q, k, v, *, causal=True, scale=None, window=None, segment_ids=None, bias=None,
              q_offset=None, dropout_rate=0.0, dropout_rng=None, impl="auto"):
  """`seqmix.ops.attention.attention`; context parallel (ring / all-gather) under a context.

  The context-parallel form is self-attention with causal / window / segment-id masks; a
  bias (ALiBi), a q_offset or attention dropout under it raise NotImplementedError.
  """
  ctx = context.active()
  if ctx is None:
    return _attention.attention(q, k, v, causal=causal, scale=scale, window=window,
                                segment_ids=segment_ids, bias=bias, q_offset=q_offset,
                                dropout_rate=dropout_rate, dropout_rng=dropout_rng, impl=impl)
  unsupported = [n for n, bad in (("bias (e.g. ALiBi)", bias is not None),
                                  ("q_offset", q_offset is not None),
                                  ("attention dropout", dropout_rate > 0)) if bad]
  if unsupported:
    raise NotImplementedError(
        f"context-parallel attention (sequence axis {ctx.axis_name!r} of size {ctx.size}) "
        f"supports causal, window and segment-id masks, not {', '.join(unsupported)}; use "
        f"position='rope' / 'none', attn_dropout=0, or a mesh with sequence=1.")
  if impl not in _BLOCK_IMPL:
    raise NotImplementedError(
        f"context-parallel attention runs blockwise_attention per block; impl={impl!r} has no "
        f"blockwise form. Use one of {sorted(_BLOCK_IMPL)}.")
  o, _ = ring_attention.context_parallel_attention(
      q, k, v, context_parallel=ctx.context_parallel, causal=causal, scale=scale,
      window=window, segment_ids=segment_ids, load_balance=ctx.load_balance,
      impl=_BLOCK_IMPL[impl], backward=ctx.backward,
      **_common(ctx, q.shape[0], q.shape[2], k.shape[2]))
  return o, None
