"""AFT: An Attention Free Transformer (Zhai et al., arXiv 2021), causal AFT-full and AFT-simple.

    q = x W_q, k = x W_k, v = x W_v                                           [B, T, A]
    AFT-full:   y_t = σ(q_t) ⊙ Σ_{t'≤t} exp(k_t' + w[t, t']) ⊙ v_t' / Σ_{t'≤t} exp(k_t' + w[t, t'])
    AFT-local:  as AFT-full with w[t, t'] replaced by 0 where pos_t − pos_t' >= window
    AFT-simple: y_t = σ(q_t) ⊙ Σ_{t'≤t} exp(k_t') ⊙ v_t' / Σ_{t'≤t} exp(k_t')
    out = y W_o                                                               [B, T, D]

(paper eq. 2-4, with the causal sum of its language-modelling experiments). Every channel
c is its own softmax over the visible tokens with logits k_t'c + w[t, t']: attention with A
heads of width 1, query 1, key k_t'c, scale 1 and the additive bias w (`seqmix.ops.attention`),
so masking, empty rows and the running max are the op's. w [L, L] (L = max_len) is a learned
pairwise position bias shared by the channels, indexed by the tokens' positions (restarting
per packed document), zero-initialised (AFT-full starts as AFT-simple). A = `hidden_dim`.

AFT-full keeps no constant-size state: decoding keeps every past token's k and v
(`common.dense_mixing.PastCache`). AFT-simple is a running softmax-weighted mean per channel:
its state is the mean so far and the log of its denominator (the running log-sum-exp, which
is also the stabiliser: no exp overflows whatever k is). Its parallel form is
`seqmix.ops.rwkv4.wkv` with decay w = 0 and bonus u = 0 (RWKV-4's WKV is AFT-simple plus a
decay); packed documents and cached chunks go through `blockwise_attention` within the chunk
(segment ids mask across documents; its log-sum-exp merges with the cached state's).
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, segment_starts
from seqmix.mixers.common import dense_mixing
from seqmix.ops import attention as attention_op
from seqmix.ops import rwkv4 as wkv_ops
from seqmix.parallel import axes

# A finite stand-in for −inf logits of invisible pairs (as mha's decoding): every query sees at
# least itself, so exp(mask − max) is exactly 0.
_MASKED = -1e30


class AFTSimpleCache(NamedTuple):
  mean: jax.Array  # [B, A] float32 Σ e^k v / Σ e^k over the current document so far
  lse: jax.Array   # [B, A] float32 log Σ e^k (−inf: nothing seen)
  seg: jax.Array   # [B] int32 segment id of the last token seen


class _AFTBase(MixerBase):
  hidden_dim: int | None = None

  def _width(self) -> int:
    a = self.hidden_dim or self.d_model
    if a < 1:
      raise ValueError(f"{self._name()}: hidden_dim={self.hidden_dim} must be >= 1 (or None "
                       f"for d_model).")
    return a

  def _name(self):
    return type(self).__name__

  def _dense(self, features, in_ax, out_ax, name):
    return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=axes.param(nn.initializers.lecun_normal(), in_ax, out_ax),
                    name=name)

  def _qkv(self, x):
    a = self._width()
    x = x.astype(self.dtype)
    q, k, v = (self._dense(a, axes.EMBED, axes.HEADS, n)(x) for n in ("query", "key", "value"))
    return q, k, v                                                     # [b, t, a] each

  def _out(self, q, mean):
    y = jax.nn.sigmoid(q) * mean.astype(self.dtype)
    return self._dense(self.d_model, axes.HEADS, axes.EMBED, "output")(y)


def _channel_heads(k, v):
  """k, v [B,T,A] -> (q [B,T,A,1] ones, k, v [B,T,A,1]): one width-1 attention head per channel."""
  return jnp.ones_like(k)[..., None], k[..., None], v[..., None]


@registry.register(
    "aft", paper="An Attention Free Transformer", year=2021, venue="arXiv", family="mlp-mixer",
    op="attention.attention", parents=("mha",), constant_state=False,
    test_kwargs={"max_len": 64}, url="https://arxiv.org/abs/2105.14103")
class AFTFull(_AFTBase):
  """Causal AFT-full.  x [B,T,D] -> y [B,T,D].

  max_len: L, rows and columns of the pairwise position bias w; sequences (and caches) longer
    than L are refused, positions outside [0, L) give NaN.
  hidden_dim: A, width of q, k, v (None: d_model).
  impl: `seqmix.ops.attention.attention` impl; the impl named here is the impl run.
  """
  max_len: int = 1024
  impl: str = "auto"

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    """Growing cache of k and v ([B, max_len, A, 2]) for max_len <= self.max_len tokens."""
    dense_mixing.check_max_len("aft", "init_cache max_len", max_len, self.max_len)
    return dense_mixing.init_past_cache(batch_size, max_len, (self._width(), 2), dtype)

  def _bias(self, w, pos_q, pos_k):
    """w [L,L] at (pos_q [B,T], pos_k [B,S]) -> [B,T,S] float32."""
    return dense_mixing.table_at(w, pos_q, pos_k)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], PastCache | None). positions [B,T] index w (default: the
    token's place in the stream)."""
    del deterministic
    b, t, _ = x.shape
    if cache is None:
      dense_mixing.check_max_len("aft", "sequence length T", t, self.max_len)
    w = self.param("pos_bias", axes.param(nn.initializers.zeros, axes.NONE, axes.NONE),
                   (self.max_len, self.max_len), self.param_dtype)
    q, k, v = self._qkv(x)
    index, positions = dense_mixing.token_index(cache, b, t, positions)
    seg = dense_mixing.segments_or_zeros(segment_ids, b, t)
    kv, pos_k, visible = dense_mixing.with_past(cache, jnp.stack([k, v], -1), index, positions,
                                                seg)                  # [b, s, a, 2]
    bias = self._bias(w.astype(jnp.float32), positions, pos_k)[:, None]  # [b, 1, t, s]
    ones = jnp.ones_like(k)[..., None]                                 # [b, t, a, 1] queries
    k1, v1 = kv[..., 0, None], kv[..., 1, None]                         # [b, s, a, 1]
    if cache is None:
      mean, _ = attention_op.attention(ones, k1, v1, causal=True, scale=1.0,
                                       segment_ids=segment_ids, bias=bias, impl=self.impl)
      new_cache = None
    else:
      bias = jnp.where(visible[:, None], bias, _MASKED)
      mean, _ = attention_op.attention(ones, k1, v1, causal=False,
                                       scale=1.0, bias=bias, impl=self.impl)
      new_cache = dense_mixing.write(cache, jnp.stack([k, v], -1), index, positions, seg)
    return self._out(q, mean[..., 0]), new_cache


@registry.register(
    "aft_local", paper="An Attention Free Transformer", year=2021, venue="arXiv",
    family="mlp-mixer", op="attention.attention", parents=("aft",), constant_state=False,
    test_kwargs={"max_len": 64, "window": 3}, url="https://arxiv.org/abs/2105.14103")
class AFTLocal(AFTFull):
  """Causal AFT-local: AFT-full whose position bias is kept only for the `window` nearest
  tokens, w'[t, t'] = w[t, t'] if pos_t − pos_t' < window else 0 (paper eq. 4, causal). The
  keys beyond the window still count (with bias 0): a global softmax, a local bias.

  window: s >= 1, the tokens (the current one included) that get their learned bias.
  """
  window: int = 32

  def _bias(self, w, pos_q, pos_k):
    if self.window < 1:
      raise ValueError(f"aft_local: window={self.window} must be >= 1 (tokens with a learned "
                       f"bias, the current one included).")
    near = (pos_q[:, :, None] - pos_k[:, None, :]) < self.window            # [b, t, s]
    return jnp.where(near, dense_mixing.table_at(w, pos_q, pos_k), 0.0)


@registry.register(
    "aft_simple", paper="An Attention Free Transformer", year=2021, venue="arXiv",
    family="mlp-mixer", op="rwkv4.wkv, attention.blockwise_attention", parents=("aft",),
    constant_state=True, test_kwargs={}, url="https://arxiv.org/abs/2105.14103",
    needs_positions=True)
class AFTSimple(_AFTBase):
  """Causal AFT-simple (no position bias).  x [B,T,D] -> y [B,T,D].

  hidden_dim: A, width of q, k, v (None: d_model).
  impl: `seqmix.ops.rwkv4.wkv` impl of the parallel form without packed documents.
  attention_impl: `seqmix.ops.attention.blockwise_attention` impl for packed documents and
    cached chunks.
  chunk_size: WKV chunk length for impl="chunked".
  """
  impl: str = "auto"
  attention_impl: str = "auto"
  chunk_size: int = 16

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> AFTSimpleCache:
    del max_len, dtype  # constant-size float32 state
    a = self._width()
    return AFTSimpleCache(mean=jnp.zeros((batch_size, a), jnp.float32),
                          lse=jnp.full((batch_size, a), -jnp.inf, jnp.float32),
                          seg=jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], AFTSimpleCache | None). segment_ids [B,T]: packed documents."""
    del positions, deterministic
    if self.chunk_size < 1:
      raise ValueError(f"aft_simple: chunk_size={self.chunk_size} must be >= 1.")
    q, k, v = self._qkv(x)
    a = k.shape[-1]
    if cache is None and segment_ids is None:
      zeros = jnp.zeros((a,), jnp.float32)
      mean, _ = wkv_ops.wkv(zeros, zeros, k, v, chunk_size=self.chunk_size, impl=self.impl)
      return self._out(q, mean), None

    q1, k1, v1 = _channel_heads(k, v)
    mean, lse = attention_op.blockwise_attention(q1, k1, v1, causal=True, scale=1.0,
                                                 segment_ids=segment_ids,
                                                 impl=self.attention_impl)  # [b,t,a,1], [b,t,a]
    if cache is None:
      return self._out(q, mean[..., 0]), None
    starts = segment_starts(segment_ids, cache_last_id=cache.seg)          # [b, t] | None
    if starts is None:
      same_doc = jnp.ones(k.shape[:2], bool)
    else:
      same_doc = jnp.cumsum(starts, axis=1) == 0   # before any start: the cached document
    lse_c = jnp.where(same_doc[..., None], cache.lse[:, None], -jnp.inf)   # [b, t, a]
    mean_c = jnp.broadcast_to(cache.mean[:, None, :, None], mean.shape)
    mean, lse = attention_op.merge_partials(mean.astype(jnp.float32), lse, mean_c, lse_c)
    last_seg = cache.seg if segment_ids is None else segment_ids[:, -1].astype(jnp.int32)
    new_cache = AFTSimpleCache(mean=mean[:, -1, :, 0], lse=lse[:, -1], seg=last_seg)
    return self._out(q, mean[..., 0]), new_cache
