"""MetaFormer / PoolFormer (Yu et al., "MetaFormer is Actually What You Need for Vision",
CVPR 2022), autoregressive: the parameter-free pooling token mixer made causal.

    window = W:    p_t = (1 / n_t) Σ_{s=t−W+1}^{t} [s in t's document] x_s,  n_t = #terms
    window = None: p_t = mean of x_s over s ≤ t in t's document     (mean centering, as
                   lucidrains' metaformer-gpt)
    y_t = γ ⊙ (p_t − x_t)                                                          [B, T, D]

PoolFormer's mixer is AvgPool(x) − x (paper eq. 4, pool size 3, padding not counted); here the
pool covers the token and the W − 1 before it instead of a centred window, and never crosses a
packed document's start (those tokens are padding, not counted). γ [D] is PoolFormer's layer
scale (its block multiplies the mixer output by it, init 1e-5), the only parameter.

Decoding: window W keeps the last W − 1 inputs, their segment ids and whether the slot holds a
token (constant state); window=None keeps the running sum and count [B, D + 1] and the last
segment id, computed by `seqmix.ops.scan.linear_scan` (the count is a channel of ones; the
multiplier is 0 at a document start).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, segment_starts
from seqmix.mixers.common import segments
from seqmix.ops import scan as scan_ops
from seqmix.parallel import axes


class PoolCache(NamedTuple):
  inputs: jax.Array  # [B, W-1, D] the previous W-1 inputs, oldest first (window=None: [B, 0, D])
  seg: jax.Array     # [B, W-1] int32 their segment ids
  valid: jax.Array   # [B, W-1] bool: the slot holds a token (False before the stream starts)
  total: jax.Array   # [B, D+1] float32 running sum and count of the current document
                     #   (window=None; [B, 0] otherwise)
  last_seg: jax.Array  # [B] int32 segment id of the last token seen


@registry.register(
    "metaformer", paper="MetaFormer is Actually What You Need for Vision", year=2021,
    venue="CVPR", family="mlp-mixer", op="none (window sums); scan.linear_scan (window=None)",
    parents=("mha", "mlp_mixer"), constant_state=True, test_kwargs={"window": 3},
    url="https://arxiv.org/abs/2111.11418")
class MetaFormerPool(MixerBase):
  """Causal pooling token mixer.  x [B,T,D] -> y [B,T,D].

  window: W >= 2, tokens averaged (the current one included; PoolFormer's pool size 3), or
    None for the mean over the whole document so far.
  layer_scale_init: initial value of the per-channel output scale γ (PoolFormer: 1e-5).
  impl, chunk_size: the `seqmix.ops.scan.linear_scan` impl and chunk of window=None.
  """
  window: int | None = 3
  layer_scale_init: float = 1e-5
  impl: str = "auto"
  chunk_size: int = 64

  def _check(self):
    if self.window is not None and self.window < 2:
      raise ValueError(f"metaformer: window={self.window} must be >= 2 (window=1 averages a "
                       f"token with itself: p − x = 0, no mixing) or None (cumulative mean).")

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> PoolCache:
    del max_len  # constant-size state
    self._check()
    w = 1 if self.window is None else self.window
    d = self.d_model
    return PoolCache(inputs=jnp.zeros((batch_size, w - 1, d), dtype),
                     seg=jnp.zeros((batch_size, w - 1), jnp.int32),
                     valid=jnp.zeros((batch_size, w - 1), bool),
                     total=jnp.zeros((batch_size, d + 1 if self.window is None else 0),
                                     jnp.float32),
                     last_seg=jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], PoolCache | None). segment_ids [B,T]: packed documents."""
    del positions, deterministic
    self._check()
    b, t, d = x.shape
    gamma = self.param("layer_scale",
                       axes.param(nn.initializers.constant(self.layer_scale_init), axes.EMBED),
                       (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    if self.window is None:
      pooled, new_cache = self._cumulative(x32, segment_ids, cache)
    else:
      pooled, new_cache = self._windowed(x32, seg, cache)
    if new_cache is not None:
      last = cache.last_seg if segment_ids is None else seg[:, -1]
      new_cache = new_cache._replace(last_seg=last)
    y = gamma.astype(jnp.float32) * (pooled - x32)
    return y.astype(self.dtype), new_cache

  def _windowed(self, x, seg, cache):
    """Mean over the last W tokens of the same document.  x [B,T,D] -> ([B,T,D], cache)."""
    b, t, d = x.shape
    w = self.window
    if cache is None:
      prev = jnp.zeros((b, w - 1, d), x.dtype)
      prev_seg = jnp.zeros((b, w - 1), jnp.int32)
      prev_ok = jnp.zeros((b, w - 1), bool)
    else:
      prev, prev_seg, prev_ok = cache.inputs.astype(x.dtype), cache.seg, cache.valid
    full = jnp.concatenate([prev, x], axis=1)                               # [b, w-1+t, d]
    full_seg = jnp.concatenate([prev_seg, seg], axis=1)
    full_ok = jnp.concatenate([prev_ok, jnp.ones((b, t), bool)], axis=1)
    total = jnp.zeros_like(x)
    count = jnp.zeros((b, t), jnp.float32)
    for s in range(w):                                                      # lag s
      lo = w - 1 - s
      take = full_ok[:, lo:lo + t] & (full_seg[:, lo:lo + t] == seg)        # [b, t]
      total = total + jnp.where(take[..., None], full[:, lo:lo + t], 0.0)
      count = count + take
    new_cache = None
    if cache is not None:
      new_cache = PoolCache(inputs=full[:, t:].astype(cache.inputs.dtype), seg=full_seg[:, t:],
                            valid=full_ok[:, t:], total=cache.total, last_seg=cache.last_seg)
    return total / count[..., None], new_cache   # count >= 1: the token itself

  def _cumulative(self, x, segment_ids, cache):
    """Mean over the document so far, by a linear scan of (sum, count)."""
    b, t, _ = x.shape
    starts = segment_starts(segment_ids,
                            cache_last_id=None if cache is None else cache.last_seg)
    aug = jnp.concatenate([x, jnp.ones((b, t, 1), x.dtype)], axis=-1)       # [b, t, d+1]
    a = segments.reset_decay(jnp.ones((b, t, 1), jnp.float32), starts)
    h, h_last = scan_ops.linear_scan(a, aug, initial_state=None if cache is None else cache.total,
                                     chunk_size=self.chunk_size, impl=self.impl)
    new_cache = None if cache is None else cache._replace(total=h_last)
    return h[..., :-1] / h[..., -1:], new_cache
