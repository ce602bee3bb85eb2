"""TaLK convolution (Lioutas & Guo, "Time-aware Large Kernel Convolutions", ICML 2020), the
causal (decoder) form: each token averages a window of the past whose length it predicts.

    u = GLU(x W_1 + b_1)                                                    [B, T, D]
    a_{t,h} = σ(u_t W_a + b_a)_h · ℓ_max                                    left extent, H heads
    o_{t,c} = 1/(a_t + 1) · Σ_{j = t - a_t}^{t} u_{j,c}    (h = c // (D/H); a fractional a_t
              takes the last token u_{t-⌊a_t⌋-1} with weight a_t - ⌊a_t⌋, the paper's linear
              interpolation of the prefix sums S(t) - S(t - a_t - 1))
    y = o W_2 + b_2

The window is a per-token kernel over ℓ_max + 1 taps, k_{t,s} = clip(a_t + 1 - s, 0, 1) / (a_t + 1)
(1 inside the window, the fractional weight at its edge), run through
`seqmix.ops.conv.dynamic_causal_conv`: O(T·ℓ_max·D) work. Not built: the paper's O(T·D)
prefix-sum (summed-area table) form, which computes the same sums. Tokens before the sequence or
in another document count as zeros in the window (the normaliser stays a_t + 1), so a document
packed and alone see the same values. Decoding: the cache holds the last ℓ_max inputs (constant
size). Not built: the offsets' dropout and the non-causal right extent.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.conv.lightconv import _Base
from seqmix.parallel import axes


@registry.register(
    "talk", paper="Time-aware Large Kernel Convolutions", year=2020, venue="ICML",
    family="long-conv",
    op="conv.dynamic_causal_conv (a predicted-length averaging window per token)",
    parents=("dynamicconv",), constant_state=True,
    test_kwargs={"kernel_size": 6, "num_heads": 4})
class TaLK(_Base):
  """TaLK decoder layer.  x [B, T, D] -> y [B, T, D].

  kernel_size: K = ℓ_max + 1, the longest window (ℓ_max past tokens plus the current one).
  num_heads: H offsets per token, each shared by D/H contiguous channels.
  """

  def _check(self):
    super()._check()
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
    s = jnp.arange(kk, dtype=jnp.float32)
    w = jnp.clip(a[..., None] + 1.0 - s, 0.0, 1.0) / (a[..., None] + 1.0)   # [b, t, h, K]
    # _per_channel expects torch order (index K-1-s for tap s): flip so tap s stays tap s.
    k = self._per_channel(w[..., ::-1])                                        # [b, t, K, d]
    y, new_cache = self._dynamic_conv(u, k, segment_ids, cache)
    return self._out(y), new_cache
