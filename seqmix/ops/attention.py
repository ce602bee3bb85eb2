"""Softmax attention: `attention` and `blockwise_attention` (DESIGN.md, "Op contract").

Semantics (both ops). q [B,T,H,K], k [B,S,G,K], v [B,S,G,V] with H % G == 0; query head `i`
reads key/value head `i // (H/G)` (G = H: MHA, G = 1: MQA, otherwise GQA). Query `i` sits at
absolute position `q_offset + i`, key `j` at `kv_offset + j` (`attention` has kv_offset = 0);
the default `q_offset = kv_offset + S − T` makes a short query block the end of the keys.

    logits[b,h,i,j] = scale · q[b,i,h]·k[b,j,h // (H/G)] + bias[b,h,i,j]
    visible(i, j)   = (not causal or pos_k(j) <= pos_q(i))
                      and (window is None or pos_k(j) > pos_q(i) − window)
                      and (segment ids: q_ids[b,i] == kv_ids[b,j])
    o[b,i,h]        = Σ_j softmax_j(logits | visible) v[b,j,h // (H/G)]
    lse[b,i,h]      = log Σ_{visible j} exp(logits[b,h,i,j])   (float32)

A query that sees no key gets o = 0, lse = −inf and zero (finite) gradients. Outputs are in
the dtype of v; accumulation is float32.

Forms (`impl`):
  reference  einsum softmax in float32 over the whole [T, S] logits: the oracle.
  xla        `jax.nn.dot_product_attention(implementation="xla")` with a boolean mask built
             from the arguments (`attention` only; it returns no lse).
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only, bf16/fp16
             (`attention` only: cuDNN returns no lse we can differentiate).
  chunked    memory-efficient pure JAX: a `lax.scan` over key blocks of `CHUNK_BLOCK_K` keys
             with an online (running max) softmax; the per-block body is rematerialised in
             the backward pass, so neither pass holds more than [T, CHUNK_BLOCK_K] logits.
  pallas     flash attention kernels (`kernels_pallas/attention`, FlashAttention-2 forward,
             dK/dV and dQ passes with causal / window block skipping): compiled through
             the Pallas Triton lowering on GPU, run in the Pallas interpreter elsewhere
             (correctness only: slow). No additive `bias` (NotImplementedError naming the
             impls that take one). Block sizes: `PALLAS_BLOCK_SIZES`.

Masked logits never enter `exp` as `x − (−inf)`: the running max is replaced by 0 where it is
−inf and masked entries are set to −inf *after* the subtraction, so exp gives exact zeros
whose gradients are zero. The max itself is a stop-gradient (the result does not depend on
the shift), which keeps its gradient out of the picture.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from seqmix.ops import _chunk
from seqmix.ops import _impl

# Keys per step of the `chunked` form. Module-level so tests (and users) can shrink it; it is
# read when a call is traced.
CHUNK_BLOCK_K = 512
# Tile sizes of the `pallas` form (None: the kernel's defaults, tuned for Hopper and shrunk
# per dtype and head dim to fit shared memory; a BlockSizes set here is used as given, e.g.
# `BlockSizes(dq_atomic=True)` for the atomic-dQ backward). Read when a call is traced; tests
# shrink it to get several blocks at T = 63 / 100.
PALLAS_BLOCK_SIZES = None

_ATTENTION_IMPLS = {"reference": True, "xla": True, "cudnn": True, "chunked": True,
                    "pallas": True}
_BLOCKWISE_IMPLS = {"reference": True, "chunked": True, "pallas": True}
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def attention(q, k, v, *, causal=True, scale=None, window=None, segment_ids=None, bias=None,
              q_offset=None, dropout_rate=0.0, dropout_rng=None, impl="auto"):
  """Softmax attention.  q [B,T,H,K], k [B,S,G,K], v [B,S,G,V] -> (o [B,T,H,V], None).

  Args:
    q, k, v: queries, keys, values; H % G == 0 (GQA / MQA when G < H).
    causal: keys at positions <= the query's position only.
    scale: logit scale (default K ** -0.5).
    window: sliding window W (needs causal=True): keys at positions > query position − W
      (W keys, the query's own included).
    segment_ids: int [B,T] when T == S, or a pair (q_ids [B,T], kv_ids [B,S]); only equal
      ids attend.
    bias: additive logit bias broadcastable to [B,H,T,S].
    q_offset: absolute position of query 0 (keys start at 0); default S − T. May be a traced
      scalar.
    dropout_rate, dropout_rng: dropout on the attention probabilities (training; nanoGPT's
      attn_dropout). An extension of the contract: only `reference` supports it, and `auto`
      picks `reference` when dropout_rate > 0.
    impl: "reference" | "xla" | "cudnn" | "chunked" | "pallas" | "auto".
  Returns:
    (o [B,T,H,V] in v's dtype, None).
  """
  spec = _Spec.make(q, k, v, causal, scale, window, segment_ids, bias, q_offset, 0)
  dropout = None
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("attention: dropout_rate > 0 needs dropout_rng (a PRNG key).")
    dropout = (float(dropout_rate), dropout_rng)
    auto_choice = {"default": "reference"}
  else:
    auto_choice = _attention_auto(q, k, v, q_offset, spec)
  impl = _impl.resolve("attention", impl, _ATTENTION_IMPLS, auto_choice)
  if dropout is not None and impl != "reference":
    raise ValueError(f"attention impl={impl!r} has no attention dropout; use impl='reference' "
                     "or 'auto' with dropout_rate > 0, or set dropout_rate=0.")
  if impl == "reference":
    o, _ = _reference(q, k, v, spec, dropout)
  elif impl == "chunked":
    o, _ = _chunked(q, k, v, spec, CHUNK_BLOCK_K)
  elif impl == "pallas":
    o, _ = _pallas(q, k, v, spec, "attention")
  elif impl == "xla":
    o = _xla(q, k, v, spec)
  else:
    o = _cudnn(q, k, v, spec, q_offset)
  return o, None


def blockwise_attention(q, k, v, *, causal=True, scale=None, window=None, segment_ids=None,
                        bias=None, q_offset=None, kv_offset=0, impl="auto"):
  """Attention over one block of keys, with the log-sum-exp needed to merge blocks.

  Arguments as `attention`, plus `kv_offset` (absolute position of key 0; default 0); the
  default q_offset is kv_offset + S − T. Both offsets may be traced scalars (ring attention
  computes them from the device index). Partial results over disjoint key blocks merge
  exactly with `merge_partials`.

  Returns:
    (o [B,T,H,V] in v's dtype, lse [B,T,H] float32); lse = −inf and o = 0 where a query sees
    no key of this block.
  """
  spec = _Spec.make(q, k, v, causal, scale, window, segment_ids, bias, q_offset, kv_offset)
  impl = _impl.resolve("blockwise_attention", impl, _BLOCKWISE_IMPLS,
                       {"cpu": "reference", "default": "chunked"})
  if impl == "reference":
    return _reference(q, k, v, spec)
  if impl == "pallas":
    return _pallas(q, k, v, spec, "blockwise_attention")
  return _chunked(q, k, v, spec, CHUNK_BLOCK_K)


def merge_partials(o1, lse1, o2, lse2):
  """Merge attention over two disjoint key blocks.  o [B,T,H,V], lse [B,T,H] -> (o, lse).

  lse = logaddexp(lse1, lse2), o = e^{lse1−lse} o1 + e^{lse2−lse} o2 (float32 inside, o in
  o1's dtype). Rows where both lse are −inf stay o = 0, lse = −inf with zero gradients.
  """
  lse1 = lse1.astype(jnp.float32)
  lse2 = lse2.astype(jnp.float32)
  m = lax.stop_gradient(jnp.maximum(lse1, lse2))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)   # exact zeros for −inf inputs
  total = w1 + w2
  safe = jnp.where(total > 0, total, 1.0)
  lse = jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)
  o = (w1 / safe)[..., None] * o1.astype(jnp.float32) + (w2 / safe)[..., None] * o2.astype(
      jnp.float32)
  return o.astype(o1.dtype), lse


class _Spec:
  """Validated, normalised arguments shared by every form."""

  def __init__(self, **kw):
    self.__dict__.update(kw)

  @classmethod
  def make(cls, q, k, v, causal, scale, window, segment_ids, bias, q_offset, kv_offset):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
      raise ValueError(f"attention: q, k, v must be [B,T,H,D]; got {q.shape=}, {k.shape=}, "
                       f"{v.shape=}.")
    b, tq, hq, dk = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != dk:
      raise ValueError(f"attention: k must be [B,S,G,K] and v [B,S,G,V] with q's B and K; got "
                       f"{q.shape=}, {k.shape=}, {v.shape=}.")
    tk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
      raise ValueError(f"attention: the {hq} query heads must be a multiple of the {hkv} "
                       f"key/value heads (query head i reads kv head i // (H/G)); got "
                       f"{q.shape=}, {k.shape=}.")
    if window is not None:
      if not causal:
        raise ValueError(f"attention: window={window} needs causal=True (a sliding window "
                         "looks back only).")
      if int(window) < 1:
        raise ValueError(f"attention: window={window} must be >= 1 (the number of keys a "
                         "query sees, itself included), or None for no window.")
      window = int(window)
    if segment_ids is None:
      q_ids = kv_ids = None
    elif isinstance(segment_ids, (tuple, list)):
      q_ids, kv_ids = segment_ids
      if q_ids.shape != (b, tq) or kv_ids.shape != (b, tk):
        raise ValueError(f"attention: segment_ids pair must be (q_ids [B,T]={(b, tq)}, kv_ids "
                         f"[B,S]={(b, tk)}); got {q_ids.shape} and {kv_ids.shape}.")
    else:
      if tq != tk:
        raise ValueError(f"attention: with T={tq} queries and S={tk} keys pass segment_ids as "
                         f"a pair (q_ids [B,T], kv_ids [B,S]); got one array "
                         f"{segment_ids.shape}.")
      if segment_ids.shape != (b, tq):
        raise ValueError(f"attention: segment_ids must be [B,T]={(b, tq)}; got "
                         f"{segment_ids.shape}.")
      q_ids = kv_ids = segment_ids
    bias4 = None
    if bias is not None:
      bias4 = jnp.asarray(bias)
      if bias4.ndim > 4:
        raise ValueError(f"attention: bias must broadcast to [B,H,T,S]; got {bias4.shape}.")
      bias4 = bias4.reshape((1,) * (4 - bias4.ndim) + bias4.shape)
      try:
        np.broadcast_shapes(bias4.shape, (b, hq, tq, tk))
      except ValueError:
        raise ValueError(f"attention: bias of shape {bias.shape} does not broadcast to "
                         f"[B,H,T,S]={(b, hq, tq, tk)}.") from None
    if q_offset is None:
      q_offset = kv_offset + (tk - tq)
    return cls(b=b, tq=tq, tk=tk, hq=hq, hkv=hkv, causal=bool(causal),
               scale=float(dk ** -0.5) if scale is None else scale, window=window,
               q_ids=q_ids, kv_ids=kv_ids, bias=bias4, q_offset=q_offset, kv_offset=kv_offset)

  def visible(self, q_idx, k_idx, q_ids=None, kv_ids=None):
    """bool [B|1, 1, Tq', Sk']: which (query, key) pairs attend, for local indices q_idx, k_idx.

    q_ids [B,Tq'], kv_ids [B,Sk']: the segment ids of these queries and keys (or None).
    """
    q_pos = jnp.asarray(self.q_offset, jnp.int32) + q_idx.astype(jnp.int32)   # [tq']
    k_pos = jnp.asarray(self.kv_offset, jnp.int32) + k_idx.astype(jnp.int32)  # [sk']
    m = jnp.ones((q_idx.shape[0], k_idx.shape[0]), bool)
    if self.causal:
      m = k_pos[None, :] <= q_pos[:, None]
    if self.window is not None:
      m = m & (k_pos[None, :] > q_pos[:, None] - self.window)
    m = m[None, None]                                                         # [1, 1, tq, sk]
    if q_ids is not None:
      m = m & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])           # [b, 1, tq, sk]
    return m


def _softmax_rows(s, mask):
  """Masked softmax statistics.  s, mask [..., S] -> (p [..., S] unnormalised, m [...], l [...]).

  p = exp(s − m) on visible entries and exactly 0 elsewhere, m the (stop-gradient) row max
  with −inf replaced by 0, l = Σ p.
  """
  m = lax.stop_gradient(jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(jnp.where(mask, s - m[..., None], -jnp.inf))
  return p, m, jnp.sum(p, axis=-1)


def _finish(acc, m, l):
  """acc [..., V] / l and lse = m + log l, with o = 0 and lse = −inf where l = 0."""
  safe = jnp.where(l > 0, l, 1.0)
  return acc / safe[..., None], jnp.where(l > 0, m + jnp.log(safe), -jnp.inf)


def _reference(q, k, v, spec, dropout=None):
  """Whole-matrix float32 softmax.  -> (o [B,T,H,V] v.dtype, lse [B,T,H] float32).

  dropout: None or (rate, rng): inverted dropout on the normalised probabilities.
  """
  g = spec.hq // spec.hkv
  k32 = jnp.repeat(k.astype(jnp.float32), g, axis=2)   # [b, s, h, k]: head i <- i // g
  v32 = jnp.repeat(v.astype(jnp.float32), g, axis=2)   # [b, s, h, v]
  s = jnp.einsum("bthk,bshk->bhts", q.astype(jnp.float32), k32) * spec.scale  # [b, h, t, s]
  if spec.bias is not None:
    s = s + spec.bias.astype(jnp.float32)
  mask = spec.visible(jnp.arange(spec.tq), jnp.arange(spec.tk), spec.q_ids, spec.kv_ids)
  p, m, l = _softmax_rows(s, mask)
  if dropout is not None:
    rate, rng = dropout
    keep = jax.random.bernoulli(rng, 1.0 - rate, p.shape)
    p = jnp.where(keep, p / (1.0 - rate), 0.0)
  acc = jnp.einsum("bhts,bshv->bhtv", p, v32)          # [b, h, t, v]
  o, lse = _finish(acc, m, l)
  return o.transpose(0, 2, 1, 3).astype(v.dtype), lse.transpose(0, 2, 1)  # [b, t, h, ...]


def _chunked(q, k, v, spec, block_k):
  """Online softmax over key blocks (lax.scan).  -> (o [B,T,H,V] v.dtype, lse [B,T,H] f32)."""
  b, tq, hq, hkv, tk = spec.b, spec.tq, spec.hq, spec.hkv, spec.tk
  g = hq // hkv
  c = max(1, min(int(block_k), tk))
  kp, _ = _chunk.pad_time(k, c)
  vp, _ = _chunk.pad_time(v, c)
  n = kp.shape[1] // c
  kb = jnp.moveaxis(_chunk.to_chunks(kp, c), 1, 0)      # [n, b, c, g_kv, k]
  vb = jnp.moveaxis(_chunk.to_chunks(vp, c), 1, 0)      # [n, b, c, g_kv, v]
  xs = {"j": jnp.arange(n), "k": kb, "v": vb}
  if spec.kv_ids is not None:
    ids, _ = _chunk.pad_time(spec.kv_ids, c)
    xs["ids"] = jnp.moveaxis(_chunk.to_chunks(ids, c), 1, 0)   # [n, b, c]
  if spec.bias is not None:
    bias = spec.bias
    bias = jnp.broadcast_to(bias, bias.shape[:3] + (tk,))
    bias, _ = _chunk.pad_time(bias, c, axis=3)
    bb, bh, bt = bias.shape[:3]
    # [bb, bh, bt, n*c] -> [n, bb, g_kv|1, g|1, bt, c]: head i = kv_head * g + group member.
    bias = bias.reshape(bb, hkv if bh > 1 else 1, g if bh > 1 else 1, bt, n, c)
    xs["bias"] = jnp.moveaxis(bias, 4, 0)
  qg = q.reshape(b, tq, hkv, g, q.shape[-1])            # [b, t, g_kv, g, k]
  q_idx = jnp.arange(tq)

  @jax.checkpoint
  def body(carry, x):
    m_old, l_old, acc = carry
    s = jnp.einsum("bthgk,bshk->bhgts", qg, x["k"],
                   preferred_element_type=jnp.float32) * spec.scale   # [b, g_kv, g, t, c]
    if "bias" in x:
      s = s + x["bias"].astype(jnp.float32)
    k_idx = x["j"] * c + jnp.arange(c)
    mask = spec.visible(q_idx, k_idx, spec.q_ids, x.get("ids"))       # [b|1, 1, t, c]
    mask = (mask & (k_idx < tk))[:, :, None]                           # [b|1, 1, 1, t, c]
    m_blk = lax.stop_gradient(jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1))
    m_new = jnp.maximum(m_old, m_blk)
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    alpha = jnp.exp(m_old - m_safe)                    # 0 while nothing was seen yet
    p = jnp.exp(jnp.where(mask, s - m_safe[..., None], -jnp.inf))
    l_new = alpha * l_old + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bhgts,bshv->bhgtv", p, x["v"].astype(jnp.float32))  # [b, g_kv, g, t, v]
    return (m_new, l_new, alpha[..., None] * acc + pv), None

  stat_shape = (b, hkv, g, tq)
  init = (jnp.full(stat_shape, -jnp.inf, jnp.float32), jnp.zeros(stat_shape, jnp.float32),
          jnp.zeros(stat_shape + (v.shape[-1],), jnp.float32))
  (m, l, acc), _ = lax.scan(body, init, xs)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  o, lse = _finish(acc, m, l)                           # [b, g_kv, g, t, (v)]
  o = o.reshape(b, hq, tq, v.shape[-1]).transpose(0, 2, 1, 3)   # [b, t, h, v]
  lse = lse.reshape(b, hq, tq).transpose(0, 2, 1)                # [b, t, h]
  return o.astype(v.dtype), lse


def _pallas(q, k, v, spec, op):
  """The flash attention kernels.  -> (o [B,T,H,V] v.dtype, lse [B,T,H] float32)."""
  if spec.bias is not None:
    others = ("'reference', 'xla', 'cudnn' or 'chunked'" if op == "attention"
              else "'reference' or 'chunked'")
    raise NotImplementedError(f"{op}: impl='pallas' does not support an additive bias; use "
                              f"impl={others} for a bias.")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"{op} impl='pallas' needs q, k, v of one dtype; got {q.dtype}, "
                     f"{k.dtype}, {v.dtype}. Cast them, or use impl='chunked' or 'reference'.")
  from kernels_pallas.attention import ops as pallas_ops   # kernels reached only from here
  shift = (jnp.asarray(spec.q_offset, jnp.int32) - jnp.asarray(spec.kv_offset, jnp.int32))
  return pallas_ops.flash_attention(
      q, k, v, shift=shift, causal=spec.causal, scale=spec.scale, window=spec.window,
      q_ids=spec.q_ids, kv_ids=spec.kv_ids, block_sizes=PALLAS_BLOCK_SIZES,
      interpret=_impl.platform() != "gpu")


def _dense_mask(spec):
  """bool [B|1, 1, T, S] for the library forms that take a mask."""
  return spec.visible(jnp.arange(spec.tq), jnp.arange(spec.tk), spec.q_ids, spec.kv_ids)


def _zero_empty_rows(o, mask):
  """o [B,T,H,V] with rows that see no key set to 0 (jax.nn returns their uniform average)."""
  seen = jnp.any(mask, axis=-1)[:, 0]                   # [b|1, t]
  return o * seen[:, :, None, None].astype(o.dtype)


def _xla(q, k, v, spec):
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"attention impl='xla' needs q, k, v of one dtype; got {q.dtype}, "
                     f"{k.dtype}, {v.dtype}. Cast them, or use impl='chunked' or 'reference'.")
  mask = _dense_mask(spec)
  o = jax.nn.dot_product_attention(q, k, v, bias=spec.bias, mask=mask, scale=spec.scale,
                                   implementation="xla")
  return _zero_empty_rows(o, mask)


def _cudnn_unsupported(q, k, v, masked=False):
  """Why cuDNN flash attention cannot run these arguments ("" when it can).

  masked: a bias or a dense [T, S] mask goes to cuDNN (see `_cudnn`); its training kernels
  then need even T and S (jax raises NotImplementedError in the backward pass otherwise).
  """
  if _impl.platform() != "gpu":
    return (f"impl='cudnn' needs a GPU (jax.default_backend() is {_impl.platform()!r}); use "
            "impl='xla', 'chunked' or 'auto' here.")
  if not (q.dtype == k.dtype == v.dtype and q.dtype in _CUDNN_DTYPES):
    return (f"impl='cudnn' needs q, k, v all bfloat16 or all float16; got {q.dtype}, "
            f"{k.dtype}, {v.dtype}. Cast them, or use impl='xla' or 'chunked'.")
  if q.shape[-1] != v.shape[-1] or q.shape[-1] > 128 or q.shape[-1] % 8:
    return (f"impl='cudnn' needs K == V, a multiple of 8 and <= 128; got K={q.shape[-1]}, "
            f"V={v.shape[-1]}. Use impl='xla' or 'chunked'.")
  t, s = q.shape[1], k.shape[1]
  if masked and (t % 2 or s % 2):
    return (f"impl='cudnn' with a bias, segment ids, q_offset or T != S needs even T and S "
            f"(cuDNN's backward pass); got T={t}, S={s}. Pad, or use impl='xla' or 'chunked'.")
  return ""


def _cudnn_aligned(spec, q_offset):
  """True when the mask is cuDNN's own causal (+ window) pattern (no [T, S] mask built)."""
  return q_offset is None and spec.tq == spec.tk and spec.q_ids is None


def _cudnn(q, k, v, spec, q_offset):
  aligned = _cudnn_aligned(spec, q_offset)
  why = _cudnn_unsupported(q, k, v, masked=spec.bias is not None or not aligned)
  if why:
    raise RuntimeError(f"attention: {why}")
  # cuDNN adds the bias in the input dtype (its kernels take a bf16/fp16 bias).
  bias = None if spec.bias is None else spec.bias.astype(q.dtype)
  if aligned:
    # The plain causal (+ window) pattern maps onto cuDNN's own masks: no [T, S] mask built.
    window = None if spec.window is None else (spec.window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=spec.scale,
                                        is_causal=spec.causal, local_window_size=window,
                                        implementation="cudnn")
  mask = _dense_mask(spec)
  o = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=spec.scale,
                                   implementation="cudnn")
  return _zero_empty_rows(o, mask)


def _attention_auto(q, k, v, q_offset, spec):
  """`auto` per platform: cuDNN on GPU when it supports the arguments, else XLA."""
  same = q.dtype == k.dtype == v.dtype
  fallback = "xla" if same else "chunked"
  gpu = fallback
  masked = spec.bias is not None or not _cudnn_aligned(spec, q_offset)
  if (_impl.platform() == "gpu" and q_offset is None
      and not _cudnn_unsupported(q, k, v, masked=masked)):
    gpu = "cudnn"
  return {"gpu": gpu, "cpu": "xla" if same else "reference", "default": fallback}
