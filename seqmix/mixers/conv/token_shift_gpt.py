"""Token Shift GPT (P. Wang, lucidrains/token-shift-gpt, 2021): an attention-free mixer that only
shifts (mean-pools) the past along the sequence, inside a gMLP-style gated feed-forward.

    h = GELU(x W_in + b_in),  (a, g) = split(h)                              [B, T, E], E = m·D/2
    g = LayerNorm(g);  g = (g^(0), ..., g^(S-1), g^(S))   S+1 equal channel chunks
    g̃_t^(i) = mean_{j ∈ [t-2^{i+1}+1, t-2^i]} g_j^(i)     i < S: the past segment of length 2^i
                                                          that ends 2^i steps back (0 if empty)
    g̃_t^(S) = g_t^(S)                                      passed through
    y = (a ⊙ (g̃ W_g + b_g)) W_out + b_out                 W_g init 1e-3, b_g init 1

The pools are one causal convolution (`common.long_conv`) with box kernels over L = 2^S taps
(chunk i: taps 2^i .. 2^{i+1}-1); the window sizes are the same kernels applied to ones (so a
window cut by the sequence or document start averages over the tokens it holds). Decoding: the
cache holds the last L-1 normalised gates (KV <= 2^S, constant size). Packed documents: taps
reading another document are masked.

The repository's model adds learned absolute positions (registry `needs_positions`) and sets
S = ceil(log2(max_seq_len)) - 1. Deviation: it divides window i by (t - 2^i) for
2^i <= t < 2^{i+1} (one less than the tokens in the window, so it divides by ~0 at t = 2^i);
this divides by the number of tokens. Not built: its first version (chunks shifted by 0..S
steps, no gate) and the discounted-cumsum variant.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import long_conv as lc
from seqmix.mixers.conv.hyena import check_int
from seqmix.parallel import axes


def pool_kernel(num_shifts: int, chunk: int) -> np.ndarray:
  """[2^S, S·chunk + S] box kernels: chunk i's channels, then one window-size channel per chunk."""
  taps = 2 ** num_shifts
  k = np.zeros((taps, num_shifts * chunk + num_shifts), np.float32)
  for i in range(num_shifts):
    a = 2 ** i
    k[a:2 * a, i * chunk:(i + 1) * chunk] = 1.0
    k[a:2 * a, num_shifts * chunk + i] = 1.0
  return k


@registry.register(
    "token_shift_gpt", paper="Token Shift GPT (lucidrains/token-shift-gpt)", year=2021,
    venue="GitHub", family="long-conv",
    op="conv.causal_conv (box kernels: mean pools of past segments)",
    parents=("s2mlp",), constant_state=True, needs_positions=True,
    test_kwargs={"num_shifts": 3, "mult": 4})
class TokenShiftGPT(MixerBase):
  """Token-shift gated feed-forward.  x [B, T, D] -> y [B, T, D].

  num_shifts: S pooled chunks (windows of 1, 2, ..., 2^{S-1} tokens; the repository uses
    ceil(log2(max_seq_len)) - 1, e.g. 9 for 1024 tokens). The gate has S+1 chunks, so
    E = mult·D/2 must be divisible by S+1.
  mult: the feed-forward expansion m (hidden m·D, gate and value E = m·D/2 each).
  gate_init: the constant init of W_g (the repository's eps = 1e-3).
  conv_impl: `causal_conv` impl of the pools.
  """
  num_shifts: int = 9
  mult: int = 4
  gate_init: float = 1e-3
  conv_impl: str = "auto"

  def _dims(self):
    check_int("num_shifts", self.num_shifts, 1)
    check_int("mult", self.mult, 1)
    if (self.mult * self.d_model) % 2:
      raise ValueError(f"mult·d_model = {self.mult * self.d_model} must be even (split into "
                       f"value and gate); change mult={self.mult}.")
    e = self.mult * self.d_model // 2
    if e % (self.num_shifts + 1):
      raise ValueError(f"the gate width E = mult·d_model/2 = {e} must be divisible by "
                       f"num_shifts+1 = {self.num_shifts + 1} (equal chunks); change num_shifts "
                       f"or mult.")
    return e, e // (self.num_shifts + 1)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> lc.LongConvCache:
    del max_len  # the last 2^S - 1 gates
    _, c = self._dims()
    s = self.num_shifts
    return lc.init_long_conv_cache(batch_size, 2 ** s, s * c + s, dtype)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], LongConvCache | None)."""
    del positions, deterministic
    e, c = self._dims()
    s = self.num_shifts
    b, t, d = x.shape
    h = jax.nn.gelu(nn.Dense(2 * e, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="project_in",
                             kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED,
                                                    axes.MLP),
                             bias_init=axes.param(nn.initializers.zeros, axes.MLP))(
                                 x.astype(self.dtype)), approximate=False)
    a, g = jnp.split(h, 2, axis=-1)                                          # [b, t, e] each
    g = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                     scale_init=axes.param(nn.initializers.ones, axes.MLP),
                     bias_init=axes.param(nn.initializers.zeros, axes.MLP), name="gate_norm")(g)
    pooled_in = jnp.concatenate([g[..., :s * c], jnp.ones((b, t, s), g.dtype)], axis=-1)
    sums, new_cache = lc.long_conv(pooled_in, jnp.asarray(pool_kernel(s, c)),
                                   segment_ids=segment_ids, cache=cache, impl=self.conv_impl)
    sums = sums.astype(jnp.float32)
    # Window sizes are integers; rounding removes the FFT's round-off, so an empty window
    # (count 0) is exactly 0 and gives a pooled value of 0.
    count = jnp.round(sums[..., s * c:])                                     # [b, t, s]
    count = jnp.repeat(count, c, axis=-1)                                    # [b, t, s·c]
    mean = jnp.where(count > 0, sums[..., :s * c] / jnp.maximum(count, 1.0), 0.0)
    shifted = jnp.concatenate([mean.astype(g.dtype), g[..., s * c:]], axis=-1)  # [b, t, e]
    gate = nn.Dense(e, dtype=self.dtype, param_dtype=self.param_dtype, name="to_gate",
                    kernel_init=axes.param(nn.initializers.constant(self.gate_init), axes.MLP,
                                           axes.MLP),
                    bias_init=axes.param(nn.initializers.ones, axes.MLP))(shifted)
    y = nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="project_out",
                 kernel_init=axes.param(nn.initializers.lecun_normal(), axes.MLP, axes.EMBED),
                 bias_init=axes.param(nn.initializers.zeros, axes.EMBED))(a * gate)
    return y, new_cache
