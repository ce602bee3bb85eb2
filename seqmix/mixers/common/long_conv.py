"""Long causal convolution with a generated kernel (Hyena, TNN, M2), with a decoding cache.

    y_t = Σ_{s=0}^{L-1} k_s ⊙ u_{t-s}           k [L, C] (k[0] multiplies the current token)

`L` is the kernel's full length (the mixer's `l_max`); a parallel call over T tokens uses the
first min(T, L) taps (the later ones would only meet the zeros before the sequence).

Three paths, which agree exactly:
  no segments, no cache   `seqmix.ops.conv.causal_conv(u, k[:min(T, L)])` (FFT for long T).
  cache                   the cache holds the previous L-1 inputs (oldest first, zeros before
                          the first token) — the op's own `initial_state` — so a prefill chunk
                          or one token is `causal_conv(u, k, initial_state=cache.inputs)`.
                          It is a growing context up to L-1 tokens (a KV-cache-like buffer of
                          fixed size L-1), not a constant-size recurrent state.
  segment ids             a long kernel cannot be reset by a gate and its kernel has no
                          recurrence, so each tap is masked where the input it reads lies in
                          another document: y_t = Σ_s k_s ⊙ u_{t-s} [seg_{t-s} = seg_t].
                          O(T·L·C) work (a scan over taps, rematerialised in the backward pass so
                          memory stays O(T·C)), in place of the FFT's O(T log T · C).

`cached_kernel` keeps a generated kernel in the decoding cache: the first cached call (the
prefill) generates it from the parameters, later calls reuse it, so one decoding step costs the
O(L·C) sum only, not the kernel network. A cache is therefore tied to the parameters it was
first used with.
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from seqmix.ops import conv as conv_ops


class LongConvCache(NamedTuple):
  inputs: jax.Array  # [B, L-1, C] the previous L-1 inputs, oldest first (zeros before the start)
  seg: jax.Array     # [B, L-1] int32 their segment ids (-1 before the first token)


class KernelCache(NamedTuple):
  kernel: jax.Array  # [L, C] float32 the generated kernel (valid once `ready`)
  ready: jax.Array   # [] bool: the kernel has been generated


def init_long_conv_cache(batch_size: int, taps: int, features: int,
                         dtype=jnp.float32) -> LongConvCache:
  return LongConvCache(jnp.zeros((batch_size, taps - 1, features), dtype),
                       jnp.full((batch_size, taps - 1), -1, jnp.int32))


def init_kernel_cache(taps: int, features: int) -> KernelCache:
  return KernelCache(jnp.zeros((taps, features), jnp.float32), jnp.zeros((), bool))


def cached_kernel(make: Callable[[], jax.Array], cache: Optional[KernelCache]):
  """The full kernel `make()` [L, C] float32, generated once per cache -> (kernel, new cache).

  cache=None: make() (the parallel forward). Otherwise the cached kernel if it is ready, else
  make(); `make` must be a pure function of arrays (no Flax module calls: it runs in lax.cond).
  """
  if cache is None:
    return make(), None
  k = jax.lax.cond(cache.ready, lambda: cache.kernel, lambda: make().astype(jnp.float32))
  return k, KernelCache(k, jnp.ones((), bool))


def long_conv(u, k, *, segment_ids=None, cache: Optional[LongConvCache] = None,
              impl: str = "auto"):
  """u [B, T, C], k [L, C] (the full kernel; cast to u's dtype) -> (y [B, T, C], cache or None).

  With a cache, `cache.inputs` must hold L-1 rows (`init_long_conv_cache(B, L, C)`).
  """
  b, t, c = u.shape
  taps = k.shape[0]
  k = k.astype(u.dtype)
  if cache is not None and cache.inputs.shape[1] != taps - 1:
    raise ValueError(f"long_conv: the cache holds {cache.inputs.shape[1]} past inputs but the "
                     f"kernel has L={taps} taps (needs L-1); build it with "
                     f"init_long_conv_cache(batch, {taps}, {c}).")
  if segment_ids is None and cache is None:
    y, _ = conv_ops.causal_conv(u, k[:min(t, taps)], impl=impl)
    return y, None
  if segment_ids is None:
    y, state = conv_ops.causal_conv(u, k, initial_state=cache.inputs.astype(u.dtype), impl=impl)
    seg = jnp.concatenate([cache.seg, jnp.zeros((b, t), jnp.int32)], axis=1)[:, t:]
    return y, LongConvCache(state.astype(cache.inputs.dtype), seg)
  seg = segment_ids.astype(jnp.int32)
  if cache is None:
    taps = min(t, taps)
    k = k[:taps]
    past = jnp.zeros((b, taps - 1, c), u.dtype)
    past_seg = jnp.full((b, taps - 1), -1, jnp.int32)
  else:
    past, past_seg = cache.inputs.astype(u.dtype), cache.seg
  full = jnp.concatenate([past, u], axis=1)                          # [b, L-1+t, c]
  full_seg = jnp.concatenate([past_seg, seg], axis=1)                # [b, L-1+t]
  y = _masked_sum(full.astype(jnp.float32), full_seg, seg, k.astype(jnp.float32)).astype(u.dtype)
  if cache is None:
    return y, None
  l1 = taps - 1
  return y, LongConvCache(full[:, full.shape[1] - l1:].astype(cache.inputs.dtype),
                          full_seg[:, full_seg.shape[1] - l1:])


def _masked_sum(full, full_seg, seg, k):
  """y_t = Σ_s k_s ⊙ full_{L-1+t-s} [full_seg_{L-1+t-s} = seg_t]; full float32 [B, L-1+T, C]."""
  taps = k.shape[0]
  l1 = taps - 1
  b, t = seg.shape

  @jax.checkpoint
  def tap(y, ks):
    k_s, s = ks
    src = jax.lax.dynamic_slice_in_dim(full, l1 - s, t, axis=1)       # u_{t-s}  [b, t, c]
    same = jax.lax.dynamic_slice_in_dim(full_seg, l1 - s, t, axis=1) == seg
    return y + jnp.where(same[..., None], src, 0.0) * k_s, None

  y, _ = jax.lax.scan(tap, jnp.zeros((b, t, full.shape[2]), jnp.float32),
                      (k, jnp.arange(taps)))
  return y
