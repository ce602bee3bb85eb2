"""TaLK convolution (Lioutas & Guo, "Time-aware Large Kernel Convolutions", ICML 2020), the
causal (decoder) form: each token averages a window of the past whose length it predicts.

    u = GLU(x W_1 + b_1)                                                    [B, T, D]
    a_{t,h} = σ(u_t W_a + b_a)_h · ℓ_max                                    left extent, H heads
    o_{t,c} = 1/(a_t + 1) · Σ_{j = t - a_t}^{t} u_{j,c}    (h = c // (D/H); a fractional a_t
              takes the last token u_{t-⌊a_t⌋-1} with weight a_t - ⌊a_t⌋, the paper's linear
              interpolation of the prefix sums S(t) - S(t - a_t - 1))
    y = o W_2 + b_2

Two forms of the same sums:
  prefix_sum  (parallel form, `parallel_form="prefix_sum"`, the paper's): P(q) = Σ_{j<=q} u_j
              (one cumsum), window = P(t) - P(t - a_t - 1) with P linear between integers,
              read by gathers: O(T·D). With packed documents P restarts at each document
              (`seqmix.ops.scan.linear_scan` with a_t = 0 at starts, so no gradient crosses)
              and P(q) := 0 before the document. float32 cumsum over T tokens: round-off
              ~T·2^-24 of the running sum, ~1e-5 relative at T = 4096 and ℓ_max = 31.
  kernel      (decoding, and `parallel_form="kernel"`): a per-token kernel over ℓ_max + 1 taps,
              k_{t,s} = clip(a_t + 1 - s, 0, 1) / (a_t + 1) (1 inside the window, the fractional
              weight at its edge), through `seqmix.ops.conv.dynamic_causal_conv`: O(T·ℓ_max·D).
Tokens before the sequence or in another document count as zeros in the window (the normaliser
stays a_t + 1), so a document packed and alone see the same values. Decoding: the cache holds the
last ℓ_max inputs (constant size). Not built: the offsets' dropout and the non-causal right
extent.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import segment_starts
from seqmix.mixers.conv.lightconv import _Base
from seqmix.ops import scan as scan_ops
from seqmix.parallel import axes


@registry.register(
    "talk", paper="Time-aware Large Kernel Convolutions", year=2020, venue="ICML",
    family="long-conv",
    op="cumsum / scan.linear_scan (packed documents) + gathers at the predicted offsets; "
       "conv.dynamic_causal_conv (decode)",
    parents=("dynamicconv",), constant_state=True,
    test_kwargs={"kernel_size": 6, "num_heads": 4})
class TaLK(_Base):
  """TaLK decoder layer.  x [B, T, D] -> y [B, T, D].

  kernel_size: K = ℓ_max + 1, the longest window (ℓ_max past tokens plus the current one).
  num_heads: H offsets per token, each shared by D/H contiguous channels.
  parallel_form: "prefix_sum" (O(T·D), the paper's) | "kernel" (the decoding form) for the
    parallel forward (cache=None); both compute the same window means.
  scan_impl, chunk_size: `linear_scan` impl and chunk size of the per-document cumsum.
  """
  parallel_form: str = "prefix_sum"
  scan_impl: str = "auto"
  chunk_size: int = 64

  def _check(self):
    super()._check()
    if self.parallel_form not in ("prefix_sum", "kernel"):
      raise ValueError(f"parallel_form={self.parallel_form!r} is not one of "
                       f"('prefix_sum', 'kernel').")
    if self.kernel_size < 2:
      raise ValueError(f"kernel_size={self.kernel_size} must be >= 2 for TaLK (the window "
                       f"spans kernel_size - 1 past tokens); set kernel_size >= 2.")

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], LongConvCache | None)."""
    del positions, deterministic
    self._check()
    b, t, _ = x.shape
    h, kk = self.num_heads, self.kernel_size
    u = self._glu_in(x)
    offset = nn.Dense(h, dtype=self.dtype, param_dtype=self.param_dtype, name="offset",
                      kernel_init=axes.param(nn.initializers.xavier_uniform(), axes.EMBED,
                                             axes.HEADS),
                      bias_init=axes.param(nn.initializers.zeros, axes.HEADS))(u)
    a = jax.nn.sigmoid(offset.astype(jnp.float32)) * (kk - 1)                # [b, t, h]
    if cache is None and self.parallel_form == "prefix_sum":
      return self._out(self._prefix_sum_means(u, a, segment_ids)), None
    s = jnp.arange(kk, dtype=jnp.float32)
    w = jnp.clip(a[..., None] + 1.0 - s, 0.0, 1.0) / (a[..., None] + 1.0)   # [b, t, h, K]
    # _per_channel expects torch order (index K-1-s for tap s): flip so tap s stays tap s.
    k = self._per_channel(w[..., ::-1])                                        # [b, t, K, d]
    y, new_cache = self._dynamic_conv(u, k, segment_ids, cache)
    return self._out(y), new_cache

  def _prefix_sum_means(self, u, a, segment_ids):
    """o_t = (P(t) - P(t - a_t - 1)) / (a_t + 1), P linear between integers: u [B,T,D], a [B,T,H]."""
    b, t, d = u.shape
    a = jnp.repeat(a, d // self.num_heads, axis=-1)                           # [b, t, d]
    uf = u.astype(jnp.float32)
    ar = jnp.arange(t)
    if segment_ids is None:
      first = jnp.zeros((b, t), jnp.int32)
      cum = jnp.cumsum(uf, axis=1)                                            # P(q)  [b, t, d]
    else:
      starts = segment_starts(segment_ids)
      first = jax.lax.cummax(jnp.where(starts, ar[None], 0), axis=1)          # document start
      decay = jnp.broadcast_to(jnp.where(starts, 0.0, 1.0)[..., None], uf.shape)
      cum, _ = scan_ops.linear_scan(decay, uf, chunk_size=self.chunk_size,
                                    impl=self.scan_impl)                      # per document
    p = ar[None, :, None] - a - 1.0                                           # [b, t, d]
    lo = jnp.floor(p)
    frac = p - lo
    floor_q = first[..., None]

    def prefix(q):                                                            # 0 before the doc
      q = q.astype(jnp.int32)
      got = jnp.take_along_axis(cum, jnp.clip(q, 0, t - 1), axis=1)
      return jnp.where(q >= floor_q, got, 0.0)

    p_lo = prefix(lo)
    window = cum - p_lo - frac * (prefix(lo + 1) - p_lo)
    return (window / (a + 1.0)).astype(u.dtype)
