"""MultiresConv (Shi et al., "Sequence Modeling with Multiresolution Convolutional Memory",
ICML 2023): the MultiresLayer with "fading" tree selection, causal.

Two filters h0 (low pass) and h1 (high pass) [D, K], shared by every level, are applied as
dilated causal depthwise convs down a wavelet-like tree (J = depth levels):

    a^(0) = x
    for level j = 1..J (dilation 2^{j-1}):
      (f ⋆_δ u)_t = Σ_{i=0}^{K-1} f_i u_{t-δ(K-1-i)}          (left-padded cross-correlation)
      d^(j) = h1 ⋆_{2^{j-1}} a^(j-1),  a^(j) = h0 ⋆_{2^{j-1}} a^(j-1)
    z = w_0 ⊙ a^(J) + Σ_{j=1}^{J} w_{J+1-j} ⊙ d^(j) + w_{J+1} ⊙ x        w [D, J+2]
    y = GLU((GELU(z)) W + b)                                          (the MultiresNet block)

Each dilated conv is `causal_conv` with the taps spread δ apart (a kernel of δ(K-1)+1 taps,
zeros between), through `common.long_conv`. The receptive field is (K-1)(2^J - 1) + 1 tokens.
Decoding: each level caches the last δ(K-1) values of its input a^(j-1), Σ_j 2^{j-1}(K-1) =
(2^J - 1)(K-1) rows in all (constant size). Packed documents: taps reading another document are
masked at every level.

Init as the reference code: h0, h1 ~ U(±√2 / (2K)), w Xavier-uniform. Not built: the wavelet
(e.g. Haar) init of h0, h1, and the "uniform" tree selection of a fixed memory size.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import long_conv as lc
from seqmix.mixers.conv.hyena import check_int
from seqmix.mixers.ssm import _common
from seqmix.parallel import axes


def dilate(h, dilation: int):
  """torch-order filter h [D, K] -> causal_conv kernel [δ(K-1)+1, D] (tap δs = h[:, K-1-s])."""
  d, k = h.shape
  out = jnp.zeros((dilation * (k - 1) + 1, d), h.dtype)
  return out.at[::dilation].set(h[:, ::-1].T)


@registry.register(
    "multiresconv", paper="Sequence Modeling with Multiresolution Convolutional Memory",
    year=2023, venue="ICML", family="long-conv",
    op="conv.causal_conv (dilated, filters shared over levels)",
    parents=("wavenet", "s4"), constant_state=True,
    test_kwargs={"kernel_size": 2, "depth": 3})
class MultiresConv(MixerBase):
  """MultiresLayer + GELU + GLU output.  x [B, T, D] -> y [B, T, D].

  kernel_size: K taps of h0 and h1 (the paper's sequence models: 2-4).
  depth: J levels (dilations 1, 2, ..., 2^{J-1}); the reference picks
    ceil(log2((seq_len-1)/(K-1) + 1)) so the tree covers the sequence.
  conv_impl: `causal_conv` impl.
  """
  kernel_size: int = 2
  depth: int = 10
  conv_impl: str = "auto"

  def _check(self):
    check_int("kernel_size", self.kernel_size, 2, " (one tap cannot reach the past)")
    check_int("depth", self.depth, 1)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> tuple:
    del max_len
    self._check()
    return tuple(lc.init_long_conv_cache(batch_size, 2 ** j * (self.kernel_size - 1) + 1,
                                         self.d_model, dtype) for j in range(self.depth))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], tuple of per-level LongConvCache | None)."""
    del positions, deterministic
    self._check()
    d, k, depth = self.d_model, self.kernel_size, self.depth
    scalar = math.sqrt(2.0) / (2 * k)

    def filt(key, shape, dtype=jnp.float32):
      return jax.random.uniform(key, shape, dtype, -scalar, scalar)

    h0 = self.param("h0", axes.param(filt, axes.EMBED, axes.CONV), (d, k), self.param_dtype)
    h1 = self.param("h1", axes.param(filt, axes.EMBED, axes.CONV), (d, k), self.param_dtype)
    w = self.param("w", axes.param(nn.initializers.xavier_uniform(), axes.EMBED, axes.NONE),
                   (d, depth + 2), self.param_dtype).astype(jnp.float32)
    x = x.astype(self.dtype)
    lo, z, new = x, w[:, depth + 1] * x.astype(jnp.float32), []
    for j in range(depth):
      dil = 2 ** j
      c = None if cache is None else cache[j]
      hi, c_new = lc.long_conv(lo, dilate(h1, dil), segment_ids=segment_ids, cache=c,
                               impl=self.conv_impl)
      lo, _ = lc.long_conv(lo, dilate(h0, dil), segment_ids=segment_ids, cache=c,
                           impl=self.conv_impl)                 # same input: same new cache
      z = z + w[:, depth - j] * hi.astype(jnp.float32)
      new.append(c_new)
    z = z + w[:, 0] * lo.astype(jnp.float32)
    y = _common.SSMOutput(d, "glu", dtype=self.dtype, param_dtype=self.param_dtype,
                          name="output")(jax.nn.gelu(z).astype(self.dtype))
    return y, (None if cache is None else tuple(new))
