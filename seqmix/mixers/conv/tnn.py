"""TNN: Toeplitz Neural Network (Qin et al., "Toeplitz Neural Network for Sequence Modeling",
ICLR 2023), causal form: the Gated Toeplitz Unit (GTU) with its Toeplitz Neural Operator (TNO).

    u = act(x W_u + b_u),  v = act(x W_v + b_v)                          [B, T, E], E = r·D
    TNO:  o_t = Σ_{s=0}^{min(t, L-1)} w_s ⊙ v_{t-s}                       a causal Toeplitz matrix
          w_s = λ^s · RPE(s)                                              [L, E]
    y = (u ⊙ o) W_o + b_o                                                 [B, T, D]

The relative position encoder (RPE) is a small MLP of the integer lag s (a scalar input):

    a = s W_p + b_p;  a ← a + Linear_j(act(Norm_j(a))) for j = 1..rpe_layers;
    RPE(s) = Linear_out(act(Norm_out(a)))                                 [F] -> [E]

Norm is LayerNorm over the F features. λ: the exponential decay of the paper (a fixed 0.99 for
every channel), or with `learn_decay` a per-channel λ = sigmoid(γ), γ ~ N(0, 0.1²), as the
authors' later code (xmixers `Tno`) learns it.

Parallel form: `seqmix.ops.conv.causal_conv` (FFT for long T) with the first min(T, L) taps,
L = l_max. The RPE depends only on the lag, so the Toeplitz kernel is the same for every
length; l_max bounds the kernel (and the decoding buffer). Decoding: the cache holds the previous
L-1 values v (a growing context up to l_max, `constant_state=False`) and the kernel w, generated
once at the first cached call (`common.long_conv`); a step is the O(L·E) sum. Packed documents:
every tap reading another document is masked.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import long_conv as lc
from seqmix.mixers.conv.hyena import check_int, torch_linear_init
from seqmix.parallel import axes

_ACTS = {"silu": jax.nn.silu, "relu": jax.nn.relu, "gelu": jax.nn.gelu}
_LN_EPS = 1e-5


class TnnCache(NamedTuple):
  long: lc.LongConvCache   # the previous L-1 values v, oldest first
  filt: lc.KernelCache     # the Toeplitz kernel w [L, E], generated once


def rpe_kernel(p, taps: int, n_layers: int, act, log_decay):
  """w [taps, E] float32 = λ^s RPE(s) for s = 0..taps-1 (p: the RPE's parameter dict)."""
  p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
  s = jnp.arange(taps, dtype=jnp.float32)[:, None]                   # [taps, 1]

  def norm(a, i):
    mu = a.mean(-1, keepdims=True)
    var = jnp.square(a - mu).mean(-1, keepdims=True)
    return (a - mu) * jax.lax.rsqrt(var + _LN_EPS) * p[f"ln_scale_{i}"] + p[f"ln_bias_{i}"]

  a = s * p["w_pos"] + p["b_pos"]                                      # [taps, F]
  for i in range(n_layers):
    a = a + act(norm(a, i)) @ p[f"w_{i}"] + p[f"b_{i}"]
  w = act(norm(a, n_layers)) @ p["w_out"] + p["b_out"]                 # [taps, E]
  return w * jnp.exp(s * log_decay)


class RpeParams(nn.Module):
  """The RPE MLP's parameters (features F, layers, output E) as a dict of arrays."""
  features: int
  out_features: int
  n_layers: int
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self):
    f, pd = self.features, self.param_dtype
    p = {"w_pos": self.param("w_pos", axes.param(torch_linear_init(1), axes.NONE, axes.STATE),
                             (1, f), pd),
         "b_pos": self.param("b_pos", axes.param(torch_linear_init(1), axes.STATE), (f,), pd)}
    for i in range(self.n_layers + 1):
      p[f"ln_scale_{i}"] = self.param(f"ln_scale_{i}", axes.param(nn.initializers.ones,
                                                                  axes.STATE), (f,), pd)
      p[f"ln_bias_{i}"] = self.param(f"ln_bias_{i}", axes.param(nn.initializers.zeros,
                                                                axes.STATE), (f,), pd)
    for i in range(self.n_layers):
      p[f"w_{i}"] = self.param(f"w_{i}", axes.param(torch_linear_init(f), axes.NONE, axes.STATE),
                               (f, f), pd)
      p[f"b_{i}"] = self.param(f"b_{i}", axes.param(torch_linear_init(f), axes.STATE), (f,), pd)
    p["w_out"] = self.param("w_out", axes.param(torch_linear_init(f), axes.STATE, axes.HEADS),
                            (f, self.out_features), pd)
    p["b_out"] = self.param("b_out", axes.param(torch_linear_init(f), axes.HEADS),
                            (self.out_features,), pd)
    return p


@registry.register(
    "tnn", paper="Toeplitz Neural Network for Sequence Modeling", year=2023, venue="ICLR",
    family="long-conv", op="conv.causal_conv (fft: RPE-generated Toeplitz kernel)",
    parents=("gau",), constant_state=False,
    test_kwargs={"l_max": 64, "rpe_dim": 16, "rpe_layers": 2})
class TNN(MixerBase):
  """Gated Toeplitz Unit.  x [B, T, D] -> y [B, T, D].

  expand_ratio: r, E = r·D channels of u, v and the Toeplitz operator (paper: 1 in the LM's GTU).
  l_max: L, the Toeplitz kernel's length (taps); decoding keeps the last L-1 values.
  rpe_dim: F, the RPE's width. rpe_layers: its residual layers.
  activation: "silu" | "relu" | "gelu" (u, v and the RPE).
  decay: λ of the fixed exponential decay (paper 0.99); ignored with learn_decay.
  learn_decay: per-channel λ = sigmoid(γ) learned (the authors' later code) instead.
  conv_impl: `causal_conv` impl.
  """
  expand_ratio: int = 1
  l_max: int = 1024
  rpe_dim: int = 32
  rpe_layers: int = 3
  activation: str = "silu"
  decay: float = 0.99
  learn_decay: bool = False
  conv_impl: str = "auto"

  def _check(self):
    check_int("expand_ratio", self.expand_ratio, 1)
    check_int("l_max", self.l_max, 1)
    check_int("rpe_dim", self.rpe_dim, 1)
    check_int("rpe_layers", self.rpe_layers, 0)
    if self.activation not in _ACTS:
      raise ValueError(f"activation={self.activation!r} is not one of {tuple(_ACTS)}.")
    if not self.learn_decay and not 0 < self.decay <= 1:
      raise ValueError(f"decay={self.decay} must be in (0, 1] (the paper uses 0.99), or set "
                       f"learn_decay=True.")

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> TnnCache:
    del max_len  # the past-value buffer is bounded by the kernel length l_max
    self._check()
    e = self.expand_ratio * self.d_model
    return TnnCache(lc.init_long_conv_cache(batch_size, self.l_max, e, dtype),
                    lc.init_kernel_cache(self.l_max, e))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], TnnCache | None)."""
    del positions, deterministic
    self._check()
    b, t, d = x.shape
    e = self.expand_ratio * d
    act = _ACTS[self.activation]
    uv = nn.Dense(2 * e, dtype=self.dtype, param_dtype=self.param_dtype, name="uv_proj",
                  kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED, axes.HEADS),
                  bias_init=axes.param(nn.initializers.zeros, axes.HEADS))(x.astype(self.dtype))
    u, v = jnp.split(act(uv), 2, axis=-1)                                  # [b, t, e] each
    p = RpeParams(self.rpe_dim, e, self.rpe_layers, param_dtype=self.param_dtype, name="rpe")()
    if self.learn_decay:
      gamma = self.param("decay_logit", axes.param(nn.initializers.normal(0.1), axes.HEADS),
                         (e,), self.param_dtype)
      log_decay = jax.nn.log_sigmoid(gamma.astype(jnp.float32))
    else:
      log_decay = jnp.full((e,), np.log(self.decay), jnp.float32)
    taps = self.l_max if cache is not None else min(t, self.l_max)
    k, filt = lc.cached_kernel(lambda: rpe_kernel(p, taps, self.rpe_layers, act, log_decay),
                               None if cache is None else cache.filt)      # [taps, e]
    o, long_cache = lc.long_conv(v, k, segment_ids=segment_ids,
                                 cache=None if cache is None else cache.long,
                                 impl=self.conv_impl)
    y = nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj",
                 kernel_init=axes.param(nn.initializers.lecun_normal(), axes.HEADS, axes.EMBED),
                 bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(u * o)
    return y, (None if cache is None else TnnCache(long_cache, filt))
