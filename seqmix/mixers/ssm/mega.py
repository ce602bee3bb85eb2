"""Mega (Ma et al., "Mega: Moving Average Equipped Gated Attention", ICLR 2023): a
multi-dimensional damped EMA feeding a single-head gated attention, as the official
`MovingAverageGatedAttention` (causal, softmax, full attention: no Mega-chunk).

    EMA, per channel d and expanded dim n < N (α, δ = sigmoid of parameters):
      h_t = (1 − α ⊙ δ) ⊙ h_{t−1} + α ⊙ β x_t            [B, T, D, N]  (seqmix.ops.scan.linear_scan)
      x'  = silu(N^-1/2 Σ_n η_n h_t,n + ω ⊙ x_t)           [B, T, D]
    v = silu(x W_v + b_v)                                  [B, T, E]   (E = h_dim)
    u, zr, hx = x' W_mx + b_mx  (split D | S + E | D)      (S = z_dim)
    u = σ(u);  z, r = split(silu(zr));  q = z ⊙ γ_q + β_q,  k = z ⊙ γ_k + β_k    [B, T, S]
    o = softmax(S^-1/2 q kᵀ + b_rel(i − j) | causal, documents) v    (seqmix.ops.attention)
    h = silu(hx + (o ⊙ r) W_h + b_h)
    y = u ⊙ (h − x)                                        [B, T, D]

Init as the official code: EMA α, δ ~ N(0, 0.2²) (pre-sigmoid), β ~ N(0, 0.02²) + (1, −1, 1,
…) over n, η, ω ~ N(0, 1); projections N(0, 0.02²) with zero biases; γ ~ N(0, 0.02²), β = 0;
the simple relative position bias N(0, 0.02²).

Deviations. (1) The official layer normalises its input itself and ends with
`residual + u ⊙ (h − residual)`; in seqmix the model owns the norm and adds the residual, so the
update gate interpolates toward the mixer's (normalised) input: y = u ⊙ (h − x). (2) The simple
relative position bias keeps only its causal half, one value per lag 0..max_positions−1 (the
official table's other half never meets a causal mask). (3) The op's `xla` / `cudnn` forms need
equal key and value widths, so q and k (or v) are zero-padded to max(S, E) before the op and the
output sliced back; zeros add nothing to q·k or to o, so this is exact.

The EMA runs as a real linear recurrence in every form (training and decoding alike), so the
two agree by construction. Decoding keeps the EMA state [B, D, N] float32 and a KV cache of the
attention (`max_len` slots, which may not exceed `max_positions`). Packed documents: the EMA
decay is 0 at each start (`linear_scan` reset) and attention sees only its own document.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import segments
from seqmix.ops import attention as attention_op
from seqmix.ops import scan as scan_ops
from seqmix.parallel import axes

REL_POS = ("simple", "none")
_MASKED = -1e30  # finite mask logit: every query sees itself, so exp(mask − max) is exactly 0


class MegaCache(NamedTuple):
  ema: jax.Array      # [B, D, N] float32 EMA state
  k: jax.Array        # [B, S, 1, P] keys (zero-padded to P = max(z_dim, h_dim))
  v: jax.Array        # [B, S, 1, P] values (zero-padded)
  idx: jax.Array      # [B, S] int32 token index held by each slot (−1: empty)
  seg: jax.Array      # [B, S] int32 segment id of each slot's token
  last_seg: jax.Array  # [B] int32 segment id of the last token seen (−1: none)
  length: jax.Array   # [B] int32 tokens seen so far


def beta_init(key, shape, dtype=jnp.float32):
  """[D, N] official EMA expansion β: N(0, 0.02²) + (1, −1, 1, −1, …) along N."""
  sign = jnp.where(jnp.arange(shape[-1]) % 2 == 0, 1.0, -1.0)
  return (0.02 * jax.random.normal(key, shape) + sign).astype(dtype)


@registry.register(
    "mega", paper="Mega: Moving Average Equipped Gated Attention", year=2023, venue="ICLR",
    family="hybrid", op="scan.linear_scan, attention.attention", parents=("s4", "gau"),
    constant_state=False,
    test_kwargs={"ema_dim": 4, "z_dim": 16, "h_dim": 48, "max_positions": 64},
    url="https://arxiv.org/abs/2209.10655")
class Mega(MixerBase):
  """Mega layer (EMA + single-head gated attention).  x [B, T, D] -> y [B, T, D].

  ema_dim: N, expanded EMA dimensions per channel (official 16).
  z_dim: S, width of the shared q/k representation z (official 128 for LM).
  h_dim: E, width of the values and the attention output (None: 2 · d_model, official).
  rel_pos: "simple" (learned bias per lag, official) or "none".
  max_positions: lags the simple bias covers; longer sequences (or caches) are refused.
  impl: `seqmix.ops.attention.attention` impl; scan_impl, chunk_size: `linear_scan`'s.
  """
  ema_dim: int = 16
  z_dim: int = 128
  h_dim: int | None = None
  rel_pos: str = "simple"
  max_positions: int = 2048
  impl: str = "auto"
  scan_impl: str = "auto"
  chunk_size: int = 64

  def _dims(self):
    """(N, S, E, P) after checking the configuration."""
    e = self.h_dim or 2 * self.d_model
    for name, val in (("ema_dim", self.ema_dim), ("z_dim", self.z_dim), ("h_dim", e),
                      ("max_positions", self.max_positions), ("chunk_size", self.chunk_size)):
      if val < 1:
        raise ValueError(f"mega: {name}={val} must be >= 1.")
    if self.rel_pos not in REL_POS:
      raise ValueError(f"mega: rel_pos={self.rel_pos!r} is not one of {REL_POS}.")
    return self.ema_dim, self.z_dim, e, max(self.z_dim, e)

  def _check_length(self, n: int, what: str):
    if self.rel_pos == "simple" and n > self.max_positions:
      raise ValueError(f"mega: {what}={n} exceeds max_positions={self.max_positions}, the lags "
                       "the relative position bias covers; raise max_positions.")

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> MegaCache:
    n, _, _, p = self._dims()
    self._check_length(max_len, "max_len")
    return MegaCache(ema=jnp.zeros((batch_size, self.d_model, n), jnp.float32),
                     k=jnp.zeros((batch_size, max_len, 1, p), dtype),
                     v=jnp.zeros((batch_size, max_len, 1, p), dtype),
                     idx=jnp.full((batch_size, max_len), -1, jnp.int32),
                     seg=jnp.zeros((batch_size, max_len), jnp.int32),
                     last_seg=jnp.full((batch_size,), -1, jnp.int32),
                     length=jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], MegaCache | None). segment_ids [B,T]: packed documents."""
    del positions, deterministic  # the relative bias works on token indices within the stream
    n, s, e, p = self._dims()
    b, t, d = x.shape
    x = x.astype(self.dtype)
    if cache is None:
      self._check_length(t, "sequence length")

    # Multi-dimensional damped EMA.
    std = lambda v: nn.initializers.normal(v)
    pe = lambda name, init, shape: self.param(name, axes.param(init, axes.EMBED, axes.STATE),
                                              shape, self.param_dtype)
    alpha = jax.nn.sigmoid(pe("ema_alpha", std(0.2), (d, n)).astype(jnp.float32))
    delta = jax.nn.sigmoid(pe("ema_delta", std(0.2), (d, n)).astype(jnp.float32))
    beta = pe("ema_beta", beta_init, (d, n)).astype(jnp.float32)
    eta = pe("ema_eta", std(1.0), (d, n)).astype(jnp.float32)
    omega = self.param("ema_omega", axes.param(std(1.0), axes.EMBED), (d,), self.param_dtype)
    last_id = None if cache is None else cache.last_seg
    starts = segments.segment_starts(segment_ids, cache_last_id=last_id)   # [b, t] | None
    decay = jnp.broadcast_to(1.0 - alpha * delta, (b, t, d, n))            # [b, t, d, n]
    decay = segments.reset_decay(decay, starts)
    drive = (alpha * beta) * x.astype(jnp.float32)[..., None]              # [b, t, d, n]
    h, ema_state = scan_ops.linear_scan(decay, drive,
                                        initial_state=None if cache is None else cache.ema,
                                        chunk_size=self.chunk_size, impl=self.scan_impl)
    ema = jnp.einsum("btdn,dn->btd", h, eta * n ** -0.5)                   # [b, t, d]
    mx = jax.nn.silu(ema.astype(self.dtype) + x * omega.astype(self.dtype))

    def dense(features, in_ax, out_ax, name):
      return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                      kernel_init=axes.param(std(0.02), in_ax, out_ax),
                      bias_init=axes.param(nn.initializers.zeros, out_ax))

    v = jax.nn.silu(dense(e, axes.EMBED, axes.MLP, "v_proj")(x))           # [b, t, e]
    base = dense(2 * d + s + e, axes.EMBED, axes.MLP, "mx_proj")(mx)
    u, zr, hx = jnp.split(base, [d, d + s + e], axis=-1)
    u = jax.nn.sigmoid(u)
    z, r = jnp.split(jax.nn.silu(zr), [s], axis=-1)                        # [b, t, s], [b, t, e]
    qk_scale = self.param("qk_gamma", axes.param(std(0.02), None, axes.KV), (2, s),
                          self.param_dtype).astype(self.dtype)
    qk_shift = self.param("qk_beta", axes.param(nn.initializers.zeros, None, axes.KV), (2, s),
                          self.param_dtype).astype(self.dtype)
    q = z * qk_scale[0] + qk_shift[0]
    k = z * qk_scale[1] + qk_shift[1]
    rel = None
    if self.rel_pos == "simple":
      rel = self.param("rel_pos_bias", axes.param(std(0.02), None), (self.max_positions,),
                       self.param_dtype).astype(jnp.float32)

    # One head, widths padded to P (exact: zero channels add nothing), [b, t, 1, p].
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, p - a.shape[-1])))[:, :, None]
    q, k, v = pad(q), pad(k), pad(v)
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
    index = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]          # [b, t]
    seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    if cache is None:
      bias = None if rel is None else self._rel_bias(rel, index[:1], index[:1])[:, None]
      o, _ = attention_op.attention(q, k, v, causal=True, scale=s ** -0.5,
                                    segment_ids=segment_ids, bias=bias, impl=self.impl)
      new_cache = None
    else:
      o, new_cache = self._decode(q, k, v, index, seg, rel, cache, s)
      new_cache = new_cache._replace(ema=ema_state,
                                     last_seg=segments.last_segment_id(segment_ids, b))
    o = o[:, :, 0, :e]                                                     # [b, t, e]

    h = jax.nn.silu(hx + dense(d, axes.MLP, axes.EMBED, "h_proj")(o * r))
    return u * (h - x), new_cache

  def _rel_bias(self, rel, q_idx, k_idx):
    """[B, Tq, Tk] learned bias per lag q − k (clipped at 0: future keys are masked anyway)."""
    lag = jnp.clip(q_idx[:, :, None] - k_idx[:, None, :], 0, self.max_positions - 1)
    return rel[lag]

  def _decode(self, q, k, v, index, seg, rel, cache, s):
    """Attend from T new tokens to [cache slots, new tokens]; write the new tokens in.

    q, k, v [B,T,1,P], index/seg [B,T] -> (o [B,T,1,P], MegaCache with ema unchanged).
    """
    b, t = index.shape
    k_all = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)         # [b, S + t, 1, p]
    v_all = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
    idx_all = jnp.concatenate([cache.idx, index], axis=1)                 # [b, S + t]
    seg_all = jnp.concatenate([cache.seg, seg], axis=1)
    k_idx, q_idx = idx_all[:, None, :], index[:, :, None]
    visible = (k_idx >= 0) & (k_idx <= q_idx) & (seg_all[:, None, :] == seg[:, :, None])
    base = 0.0 if rel is None else self._rel_bias(rel, index, idx_all)
    bias = jnp.where(visible, base, jnp.float32(_MASKED))[:, None]         # [b, 1, t, S + t]
    o, _ = attention_op.attention(q, k_all, v_all, causal=False, scale=s ** -0.5, bias=bias,
                                  impl=self.impl)
    rows = jnp.arange(b)[:, None]
    put = lambda buf, new: buf.at[rows, index].set(new.astype(buf.dtype), mode="drop")
    return o, cache._replace(k=put(cache.k, k), v=put(cache.v, v), idx=put(cache.idx, index),
                             seg=put(cache.seg, seg), length=cache.length + t)
