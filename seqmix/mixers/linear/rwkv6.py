"""RWKV-6 "Finch" time mixing (Peng et al., "Eagle and Finch: RWKV with Matrix-Valued States and
Dynamic Recurrence", COLM 2024), through `seqmix.ops.linear_attention.rwkv6`.

    xx = shift(x) − x                                           token shift (x_{t−1} − x_t)
    m_□ = μ_□ + tanh((x + xx ⊙ μ_x) A) B_□,  □ ∈ {w, k, v, r, g}   data-dependent lerp (ddlerp),
    x_□ = x + xx ⊙ m_□                                            one rank-32 LoRA per □
    r, k, v = x_r W_r, x_k W_k, x_v W_v;   g = silu(x_g W_g)
    w_t = −exp(d + tanh(x_w A_d) B_d)   [B, T, H, K]                log decay (rank-64 LoRA)
    o_t = r_t (S_{t−1} + diag(u) k_tᵀ v_t),  S_t = diag(exp(w_t)) S_{t−1} + k_tᵀ v_t  (scale 1)
    y = W_o (GroupNorm_H(o) ⊙ g)                                  one group per head

Initialisation as the official RWKV-LM `RWKV_Tmix_x060` and its `generate_init_weight`, with
r0 = layer_idx / (n_layers − 1) and r1 = 1 − layer_idx / n_layers and i/D over the channels:
μ_x = μ_w = μ_k = 1 − (i/D)^r1, μ_v = 1 − ((i/D)^r1 + 0.3 r0), μ_r = μ_g = 1 − (i/D)^(r1/2);
decay d_n = −6 + 5 (n/(D_a−1))^(0.7 + 1.3 r0) (per-step decay exp(−exp(d)) from ~0.998 down to
~0.69, faster with depth); bonus u_n = r0 (1 − n/(D_a−1)) + ((n+1) mod 3 − 1)·0.1; LoRA down
factors zero and up factors U(±0.01) (so every LoRA starts at its base value); W_r, W_v
orthogonal, W_k and W_g orthogonal with gain 0.1, W_o zero; group-norm eps 64e-5 (RWKV's
1e-5 · head_size_divisor² with divisor 8).

Packed documents: the token shift masks x_{t−1} across a boundary; the state is cleared at a
document's first token s by a −inf decay there (clearing everything written before s from S_s).
rwkv6 reads S_{s−1} before that decay, so at a start token the op is given r_s = 0 and the
current-token bonus term r_s (diag(u) k_sᵀ v_s) is added here — the exact output of a fresh
state, with no gradient path to the previous document.
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.lowrank import LowRank
from seqmix.mixers.common.token_shift import TokenShiftCache, init_token_shift_cache, token_shift
from seqmix.parallel import axes
from seqmix.parallel import dispatch

# RWKV-LM: GroupNorm eps = 1e-5 · head_size_divisor², head_size_divisor = 8.
GROUP_NORM_EPS = 1e-5 * 8 ** 2
_N_LERPS = 5  # w, k, v, r, g


class RWKV6Cache(NamedTuple):
  shift: TokenShiftCache  # the previous token's input (token shift)
  state: jax.Array        # [B, H, K, V] float32 wkv state
  seg: jax.Array          # [B] int32 segment id of the last token seen


def depth_ratios(layer_idx: int, n_layers: int) -> tuple[float, float]:
  """RWKV's (ratio_0_to_1, ratio_1_to_almost0) = (l / (L−1), 1 − l / L); L = 1 gives (0, 1)."""
  if not 0 <= layer_idx < max(n_layers, 1):
    raise ValueError(f"layer_idx={layer_idx} must be in [0, n_layers={n_layers}); pass the "
                     f"block's index in the stack and the stack depth.")
  return layer_idx / max(n_layers - 1, 1), 1.0 - layer_idx / n_layers


def _const(values):
  """An initialiser returning fixed values (RWKV's layer-dependent inits)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.asarray(values, jnp.float32), shape).astype(dtype)
  return init


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _orthogonal(gain: float):
  """torch.nn.init.orthogonal_ with RWKV's gain: × sqrt(out/in) when out > in."""
  def init(key, shape, dtype=jnp.float32):
    fan_in, fan_out = shape
    g = gain * (math.sqrt(fan_out / fan_in) if fan_out > fan_in else 1.0)
    return nn.initializers.orthogonal(g)(key, shape, dtype)
  return init


def lerp_init(d: int, layer_idx: int, n_layers: int):
  """(μ_x [D], μ [5, D] in the order w, k, v, r, g) at init."""
  r0, r1 = depth_ratios(layer_idx, n_layers)
  ddd = jnp.arange(d, dtype=jnp.float32) / d
  base = 1.0 - ddd ** r1
  half = 1.0 - ddd ** (0.5 * r1)
  mu = jnp.stack([base, base, 1.0 - (ddd ** r1 + 0.3 * r0), half, half])
  return base, mu


def decay_init(d_att: int, layer_idx: int, n_layers: int):
  """d [D_a]: the log-log decay at init, −6 + 5 (n/(D_a−1))^(0.7 + 1.3 r0)."""
  r0, _ = depth_ratios(layer_idx, n_layers)
  n = jnp.arange(d_att, dtype=jnp.float32) / max(d_att - 1, 1)
  return -6.0 + 5.0 * n ** (0.7 + 1.3 * r0)


def bonus_init(d_att: int, layer_idx: int, n_layers: int):
  """u [D_a] (reshaped to [H, K]): r0 (1 − n/(D_a−1)) + ((n+1) mod 3 − 1)·0.1."""
  r0, _ = depth_ratios(layer_idx, n_layers)
  n = jnp.arange(d_att, dtype=jnp.float32)
  return r0 * (1.0 - n / max(d_att - 1, 1)) + ((n + 1) % 3 - 1) * 0.1


@registry.register(
    "rwkv6", paper="Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence",
    year=2024, venue="COLM", family="linear-attention", op="linear_attention.rwkv6",
    parents=("rwkv4", "gla"), constant_state=True,
    test_kwargs={"head_size": 8, "mix_lora_rank": 8, "decay_lora_rank": 8}, sequence_parallel=True)
class RWKV6(MixerBase):
  """RWKV-6 time mixing.  x [B, T, D] -> y [B, T, D]; pair it with `mlp="rwkv_channel_mix"`.

  head_size: K = V per head (64); H = D / head_size heads, attention width D_a = D.
  mix_lora_rank: rank of the five token-shift (ddlerp) LoRAs (32).
  decay_lora_rank: rank of the decay LoRA (64).
  norm_eps: eps of the per-head group norm (64e-5).
  chunk_size, impl: passed to `linear_attention.rwkv6`.
  """
  head_size: int = 64
  mix_lora_rank: int = 32
  decay_lora_rank: int = 64
  norm_eps: float = GROUP_NORM_EPS
  chunk_size: int = 64
  impl: str = "auto"

  def _heads(self):
    check_divisible("d_model", self.d_model, self.head_size, "head_size")
    depth_ratios(self.layer_idx, self.n_layers)
    return self.d_model // self.head_size

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> RWKV6Cache:
    del max_len
    h, k = self._heads(), self.head_size
    return RWKV6Cache(init_token_shift_cache(batch_size, self.d_model, dtype),
                      jnp.zeros((batch_size, h, k, k), jnp.float32),
                      jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], RWKV6Cache | None)."""
    del positions, deterministic
    h = self._heads()
    b, t, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    mu_x0, mu0 = lerp_init(d, self.layer_idx, self.n_layers)
    mu_x = self.param("time_maa_x", axes.param(_const(mu_x0), axes.EMBED), (d,),
                      self.param_dtype)
    mu = self.param("time_maa", axes.param(_const(mu0), axes.NONE, axes.EMBED), (_N_LERPS, d),
                    self.param_dtype)
    decay = self.param("time_decay", axes.param(
        _const(decay_init(d, self.layer_idx, self.n_layers)), axes.HEADS), (d,),
        self.param_dtype)
    u = self.param("time_faaaa", axes.param(
        _const(bonus_init(d, self.layer_idx, self.n_layers).reshape(h, self.head_size)),
        axes.HEADS, axes.KV), (h, self.head_size), self.param_dtype)

    prev, shift_cache = token_shift(x, segment_ids=segment_ids,
                                    cache=None if cache is None else cache.shift)
    xx = prev - x                                                        # [b, t, d]
    lora = LowRank(d, self.mix_lora_rank, n=_N_LERPS, activation="tanh",
                   down_init=nn.initializers.zeros, up_init=_uniform(0.01), name="time_maa_lora",
                   **kw)(x + xx * mu_x.astype(self.dtype))               # [b, t, 5, d]
    mixed = x[:, :, None] + xx[:, :, None] * (mu.astype(self.dtype) + lora)  # [b, t, 5, d]
    xw, xk, xv, xr, xg = (mixed[:, :, i] for i in range(_N_LERPS))

    def proj(name, gain, inp, in_axis=axes.EMBED, out_axis=axes.HEADS, init=None):
      return nn.Dense(d, use_bias=False, name=name, **kw,
                      kernel_init=axes.param(init or _orthogonal(gain), in_axis, out_axis))(inp)

    heads = lambda a: a.reshape(b, t, h, self.head_size)                 # [b, t, h, k]
    r, k, v = heads(proj("receptance", 1.0, xr)), heads(proj("key", 0.1, xk)), heads(
        proj("value", 1.0, xv))
    g = jax.nn.silu(proj("gate", 0.1, xg))                               # [b, t, d]
    ww = LowRank(d, self.decay_lora_rank, activation="tanh", down_init=nn.initializers.zeros,
                 up_init=_uniform(0.01), out_axis=axes.HEADS, name="time_decay_lora", **kw)(xw)
    log_w = -jnp.exp(decay.astype(jnp.float32) + ww.astype(jnp.float32))  # [b, t, d]
    log_w = heads(log_w)                                                 # [b, t, h, k]

    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    u32 = u.astype(jnp.float32)
    if starts is not None:
      # See the module docstring: the op reads S_{s−1} before the reset decay at s.
      log_w = segments.reset_log_gate(log_w, starts)
      s4 = starts[:, :, None, None]
      bonus = jnp.sum(r.astype(jnp.float32) * u32 * k.astype(jnp.float32), -1,
                      keepdims=True) * v.astype(jnp.float32)             # [b, t, h, v]
      r = jnp.where(s4, jnp.zeros_like(r), r)
    o, state = dispatch.rwkv6(r, k, v, log_w, u32, scale=1.0,
                              initial_state=None if cache is None else cache.state,
                              chunk_size=self.chunk_size, impl=self.impl)
    if starts is not None:
      o = jnp.where(s4, bonus.astype(o.dtype), o)
    o = nn.GroupNorm(num_groups=h, epsilon=self.norm_eps, use_fast_variance=False, name="ln_x",
                     scale_init=axes.param(nn.initializers.ones, axes.HEADS),
                     bias_init=axes.param(nn.initializers.zeros, axes.HEADS), **kw)(
                         o.reshape(b * t, d))                            # [b·t, d]
    o = o.reshape(b, t, d) * g
    y = proj("output", 0.0, o, axes.HEADS, axes.EMBED, init=nn.initializers.zeros)
    new_cache = None if cache is None else RWKV6Cache(
        shift_cache, state, segments.last_segment_id(segment_ids, b))
    return y, new_cache
