"""Hyena (Poli et al., "Hyena Hierarchy: Towards Larger Convolutional Language Models", ICML 2023).

Order-N Hyena operator as the paper's reference code (safari `HyenaOperator`) computes it:

    (x_0, ..., x_{N-1}, v) = split_N+1(ShortConv_3(x W_in + b_in))      each [B, T, D]
    z = v
    for n = N-1, ..., 1:                                                 N-1 long convolutions
      z = x_n ⊙ z
      z = h_n * z + β_n ⊙ z                     (h_n * z)_t = Σ_{s<L} h_{n,s} ⊙ z_{t-s}
    y = (x_0 ⊙ z) W_out + b_out

So order N has N gates and N-1 implicit long filters; with the short convs as the first
filter this is the paper's recurrence z^{n+1} = x^n ⊙ (h^n * z^n) (order 2 = H3's form
q ⊙ (h * (k ⊙ v)) with k, q, v from the short convs). β [N-1, D] is the per-channel skip
(the reference's filter `bias`, init N(0, 1)).

Implicit filters h [L, (N-1)·D] (L = l_max) from positional features of the lag s = 0..L-1:

    z_s = [s/(L-1), cos(2π f_j s / L), -sin(2π f_j s / L)]_j,  f = linspace(1e-4, J-1, J),
          J = (emb_dim - 1) / 2                                          [L, emb_dim]
    h̃ = sin(ω ⊙ (... sin(ω ⊙ (z W_1 + b_1)) ... W_{1+m} + b_{1+m})) W_o    FFN of width F,
          m = num_inner_mlps hidden layers, one learned frequency vector ω [F] (init sin_freq)
    h_s = h̃_s ⊙ (exp(-|δ| s/(L-1)) + shift),  δ = linspace(ln(target)/slow, ln(target)/fast, C)

Parallel form: `seqmix.ops.conv.causal_conv` (FFT for long T) over the first min(T, L) taps.

Decoding: the cache holds, per long convolution, the previous L-1 inputs z (a buffer of past
inputs, a growing context bounded by l_max: `constant_state=False`), the short conv's last
taps, and the filter h itself, generated once at the first cached call (the prefill) and reused
by every step (`common.long_conv.cached_kernel`): a step computes (h_n * z)_t = Σ_s h_{n,s} z_{t-s}
from the cached filter and inputs, O(L·D) per convolution. The paper's distillation of the filter
into a recurrence is not built. Packed documents: every tap reading another document is masked
(`common.long_conv`; the short conv masks its taps the same way).

Deviations from the reference code: the positional features z are fixed (the reference trains
them with lr 1e-5); dropout is not built.
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import long_conv as lc
from seqmix.mixers.common.short_conv import ShortConv, ShortConvCache
from seqmix.parallel import axes


class HyenaCache(NamedTuple):
  short: ShortConvCache     # the short conv's last taps over the (N+1)·D projections
  long: tuple               # N-1 LongConvCache: each long conv's previous L-1 inputs
  filt: lc.KernelCache      # the implicit filter [L, (N-1)·D], generated once


def torch_linear_init(fan_in: int):
  """U(-1/√fan_in, 1/√fan_in): PyTorch's nn.Linear default, which the filter FFNs use."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def positional_features(taps: int, l_max: int, emb_dim: int) -> jax.Array:
  """z [taps, emb_dim] float32 for lags 0..taps-1 (rows of the l_max-long features)."""
  s = np.arange(taps, dtype=np.float64)
  bands = (emb_dim - 1) // 2
  f = np.linspace(1e-4, bands - 1, bands)
  w = 2 * np.pi * s[:, None] * f[None] / l_max
  z = np.concatenate([s[:, None] / (l_max - 1), np.cos(w), -np.sin(w)], axis=1)
  return jnp.asarray(z, jnp.float32)


def decay_window(taps: int, l_max: int, channels: int, fast: float, slow: float,
                 target: float, shift: float) -> jax.Array:
  """exp(-|δ_c| s/(L-1)) + shift [taps, channels] float32 (Hyena's ExponentialModulation)."""
  deltas = np.linspace(math.log(target) / slow, math.log(target) / fast, channels)
  t = np.arange(taps, dtype=np.float64)[:, None] / (l_max - 1)
  return jnp.asarray(np.exp(-t * np.abs(deltas)[None]) + shift, jnp.float32)


class ImplicitFilterParams(nn.Module):
  """The parameters of Hyena's filter FFN; `filter(p, taps)` is the pure function of them.

  features: C output channels. width: F. emb_dim: positional features. num_inner: hidden layers.
  sin_freq: init of the learned frequency ω [F] of the sine activation.
  """
  features: int
  width: int
  emb_dim: int
  num_inner: int
  sin_freq: float
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self):
    """The parameter dict {w_in, b_in, w_{i}, b_{i}, w_out, freq} (arrays)."""
    f, pd = self.width, self.param_dtype
    p = {"w_in": self.param("w_in", axes.param(torch_linear_init(self.emb_dim), axes.NONE,
                                               axes.STATE), (self.emb_dim, f), pd),
         "b_in": self.param("b_in", axes.param(torch_linear_init(self.emb_dim), axes.STATE),
                            (f,), pd)}
    for i in range(self.num_inner):
      p[f"w_{i}"] = self.param(f"w_{i}", axes.param(torch_linear_init(f), axes.NONE,
                                                    axes.STATE), (f, f), pd)
      p[f"b_{i}"] = self.param(f"b_{i}", axes.param(torch_linear_init(f), axes.STATE), (f,), pd)
    p["w_out"] = self.param("w_out", axes.param(torch_linear_init(f), axes.STATE, axes.HEADS),
                            (f, self.features), pd)
    p["freq"] = self.param("freq", axes.param(nn.initializers.constant(self.sin_freq),
                                              axes.STATE), (f,), pd)
    return p


def implicit_filter(p, z, window, num_inner: int):
  """h [taps, C] float32 = FFN_sin(z) ⊙ window, z [taps, emb_dim], window [taps, C]."""
  p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
  h = jnp.sin(p["freq"] * (z @ p["w_in"] + p["b_in"]))
  for i in range(num_inner):
    h = jnp.sin(p["freq"] * (h @ p[f"w_{i}"] + p[f"b_{i}"]))
  return (h @ p["w_out"]) * window


def check_int(name: str, value, low: int, why: str = ""):
  if not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}={value!r} must be an integer >= {low}{why}; set {name} >= {low}.")


@registry.register(
    "hyena", paper="Hyena Hierarchy: Towards Larger Convolutional Language Models",
    year=2023, venue="ICML", family="long-conv",
    op="conv.causal_conv (fft: implicit long filters) + conv.causal_conv (short)",
    parents=("h3", "ckconv"), constant_state=False,
    test_kwargs={"l_max": 64, "filter_order": 16})
class Hyena(MixerBase):
  """Hyena operator.  x [B, T, D] -> y [B, T, D].

  order: N >= 2 gates (N-1 long convolutions); the paper's LMs use 2.
  l_max: L, the filter length (the positional features and decay are normalised by it); a
    sequence longer than L sees the last L tokens (the filter has L taps).
  filter_order: F, width of the filter FFN (reference: 64).
  emb_dim: positional features (odd, >= 3: t plus (emb_dim-1)/2 cos/sin bands; reference 3).
  num_inner_mlps: hidden layers of the filter FFN (reference 2).
  sin_freq: initial frequency ω of the sine activations (reference w=1).
  short_conv_size: taps of the short depthwise conv over the projections (reference 3).
  fast_decay_pct, slow_decay_pct, decay_target, modulation_shift: the decay window (reference
    0.3, 1.5, 1e-2, 0): channel c decays to `decay_target` after a fraction between
    fast_decay_pct and slow_decay_pct of l_max.
  conv_impl: `causal_conv` impl of the long (and short) convolutions.
  """
  order: int = 2
  l_max: int = 1024
  filter_order: int = 64
  emb_dim: int = 3
  num_inner_mlps: int = 2
  sin_freq: float = 1.0
  short_conv_size: int = 3
  fast_decay_pct: float = 0.3
  slow_decay_pct: float = 1.5
  decay_target: float = 1e-2
  modulation_shift: float = 0.0
  conv_impl: str = "auto"

  def _check(self):
    check_int("order", self.order, 2, " (order 1 would have no long convolution)")
    check_int("l_max", self.l_max, 2)
    check_int("filter_order", self.filter_order, 1)
    check_int("num_inner_mlps", self.num_inner_mlps, 0)
    check_int("short_conv_size", self.short_conv_size, 1)
    check_int("emb_dim", self.emb_dim, 3)
    if self.emb_dim % 2 == 0:
      raise ValueError(f"emb_dim={self.emb_dim} must be odd (t plus cos/sin pairs); "
                       f"use emb_dim={self.emb_dim + 1}.")
    if not 0 < self.fast_decay_pct <= self.slow_decay_pct:
      raise ValueError(f"need 0 < fast_decay_pct <= slow_decay_pct; got "
                       f"fast_decay_pct={self.fast_decay_pct}, slow_decay_pct="
                       f"{self.slow_decay_pct} (reference: 0.3, 1.5).")
    if not 0 < self.decay_target < 1:
      raise ValueError(f"decay_target={self.decay_target} must be in (0, 1) (reference 1e-2).")

  @property
  def _filter_channels(self) -> int:
    return (self.order - 1) * self.d_model

  def _short(self, **kw):
    return ShortConv((self.order + 1) * self.d_model, kernel_size=self.short_conv_size,
                     use_bias=True, activation=None, impl=self.conv_impl, axis=axes.HEADS,
                     dtype=self.dtype, param_dtype=self.param_dtype, **kw)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> HyenaCache:
    del max_len  # the past-input buffer is bounded by the filter length l_max
    self._check()
    d = self.d_model
    return HyenaCache(
        self._short(parent=None).init_cache(batch_size, dtype),
        tuple(lc.init_long_conv_cache(batch_size, self.l_max, d, dtype)
              for _ in range(self.order - 1)),
        lc.init_kernel_cache(self.l_max, self._filter_channels))

  def _make_filter(self, taps: int):
    """A pure function () -> h [taps, (N-1)·D] float32 of this module's filter parameters."""
    p = ImplicitFilterParams(self._filter_channels, self.filter_order, self.emb_dim,
                             self.num_inner_mlps, self.sin_freq, param_dtype=self.param_dtype,
                             name="filter")()
    z = positional_features(taps, self.l_max, self.emb_dim)
    window = decay_window(taps, self.l_max, self._filter_channels, self.fast_decay_pct,
                          self.slow_decay_pct, self.decay_target, self.modulation_shift)
    return lambda: implicit_filter(p, z, window, self.num_inner_mlps)

  def _long_convs(self, v, gates, k, bias, segment_ids, caches):
    """z = v; for each gate x_n (innermost first): z = h_n * (x_n ⊙ z) + β_n ⊙ (x_n ⊙ z)."""
    d = self.d_model
    new = []
    for o, x_n in enumerate(gates):
      v = v * x_n
      y, c = self._conv(v, k[:, o * d:(o + 1) * d], segment_ids,
                        None if caches is None else caches[o])
      v = (y.astype(jnp.float32) + bias[o] * v.astype(jnp.float32)).astype(self.dtype)
      new.append(c)
    return v, tuple(new)

  def _conv(self, u, k, segment_ids, cache):
    return lc.long_conv(u, k, segment_ids=segment_ids, cache=cache, impl=self.conv_impl)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], HyenaCache | None)."""
    del positions, deterministic
    self._check()
    b, t, d = x.shape
    n = self.order
    x = x.astype(self.dtype)
    proj = nn.Dense((n + 1) * d, dtype=self.dtype, param_dtype=self.param_dtype, name="in_proj",
                    kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED,
                                           axes.HEADS),
                    bias_init=axes.param(nn.initializers.zeros, axes.HEADS))(x)
    proj, short_cache = self._short(name="short_conv")(
        proj, segment_ids=segment_ids, cache=None if cache is None else cache.short)
    parts = jnp.split(proj, n + 1, axis=-1)                                 # N+1 x [b, t, d]
    gates, v = parts[:n], parts[n]
    taps = self.l_max if cache is not None else min(t, self.l_max)
    k, filt_cache = lc.cached_kernel(self._make_filter(taps),
                                     None if cache is None else cache.filt)  # [taps, (N-1)·d]
    bias = self.param("filter_bias", axes.param(nn.initializers.normal(1.0), axes.NONE,
                                                axes.HEADS), (n - 1, d), self.param_dtype)
    z, long_caches = self._long_convs(v, gates[:0:-1], k, bias.astype(jnp.float32),
                                      segment_ids, None if cache is None else cache.long)
    y = nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj",
                 kernel_init=axes.param(nn.initializers.lecun_normal(), axes.HEADS, axes.EMBED),
                 bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(z * gates[0])
    new_cache = None if cache is None else HyenaCache(short_cache, long_caches, filt_cache)
    return y, new_cache
