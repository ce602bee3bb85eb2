"""LRU: the Linear Recurrent Unit (Orvieto et al., "Resurrecting Recurrent Neural Networks for
Long Sequences", ICML 2023).

    λ = exp(−exp(ν) + i·exp(θ))   [N] complex, |λ| < 1 (stable exponential parameterisation)
    γ = exp(γ_log)                [N], γ_log initialised to log √(1 − |λ|²) (normalisation)
    h_t = λ ⊙ h_{t−1} + γ ⊙ (B u_t)            B [N, D] complex  (seqmix.ops.scan.linear_scan)
    y_t = Re(C h_t) + D ⊙ u_t                  C [D, N] complex, D [D] real

Initialisation as the paper (Appendix A): |λ| uniform by area on the ring r_min ≤ |λ| ≤ r_max
(ν = log(−½ log(U·(r_max² − r_min²) + r_min²))), phase θ ~ U(0, max_phase) (θ_log = log θ);
B ~ CN with real and imaginary parts N(0, 1/(2D)), C with parts N(0, 1/N), D ~ N(0, 1). γ_log
is a trainable parameter as in the paper's code (not recomputed from λ after init).

The layer is the recurrence alone; the paper's block puts a norm before and a GLU/MLP after it,
which are the model's job. State [B, N] complex64; packed documents reset it (λ_t = 0) at each
document's first token.
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import segments
from seqmix.parallel import axes
from seqmix.parallel import dispatch

_HIGHEST = jax.lax.Precision.HIGHEST


class LRUCache(NamedTuple):
  state: jax.Array  # [B, N] complex64
  seg: jax.Array    # [B] int32 segment id of the last token seen (-1 before the first)


def nu_log_init(r_min: float, r_max: float):
  """ν_log [N] with |λ|² = exp(−2 exp(ν_log)) ~ U(r_min², r_max²) (uniform by area on the ring)."""
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    return jnp.log(-0.5 * jnp.log(u * (r_max ** 2 - r_min ** 2) + r_min ** 2)).astype(dtype)
  return init


def theta_log_init(max_phase: float):
  """θ_log [N] with arg λ = exp(θ_log) ~ U(0, max_phase)."""
  def init(key, shape, dtype=jnp.float32):
    return jnp.log(max_phase * jax.random.uniform(key, shape, jnp.float32)).astype(dtype)
  return init


def gamma_log_from(nu_log):
  """γ_log = log √(1 − |λ|²) for |λ| = exp(−exp(ν_log)): the init of the normaliser."""
  def init(key, shape, dtype=jnp.float32):
    del key
    mod2 = jnp.exp(-2.0 * jnp.exp(nu_log.astype(jnp.float32)))
    return jnp.broadcast_to(0.5 * jnp.log1p(-mod2), shape).astype(dtype)
  return init


def _complex_parts_init(std: float):
  """Real and imaginary parts [..., 2] each N(0, std²)."""
  def init(key, shape, dtype=jnp.float32):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return init


@registry.register(
    "lru", paper="Resurrecting Recurrent Neural Networks for Long Sequences", year=2023,
    venue="ICML", family="linear-rnn", op="scan.linear_scan", parents=("s4d", "s5", "rnn"),
    constant_state=True, test_kwargs={"d_state": 16}, url="https://arxiv.org/abs/2303.06349",
    sequence_parallel=True)
class LRU(MixerBase):
  """Linear Recurrent Unit.  x [B, T, D] -> y [B, T, D].

  d_state: N, complex state size (the paper's N; 256 for H = 128 in its LRA runs).
  r_min, r_max: init ring of |λ|, 0 <= r_min < r_max <= 1 (0.9, 0.999; the paper sweeps r_min
    in [0, 0.9] by task and uses r_max 0.999 on long tasks).
  max_phase: init range of arg λ (2π; π/10 for PathX in the paper).
  impl, chunk_size: passed to `seqmix.ops.scan.linear_scan`.
  """
  d_state: int = 256
  r_min: float = 0.9
  r_max: float = 0.999
  max_phase: float = 2 * math.pi
  impl: str = "auto"
  chunk_size: int = 64

  def _check(self):
    if not isinstance(self.d_state, int) or self.d_state < 1:
      raise ValueError(f"lru: d_state={self.d_state!r} must be an int >= 1 (the complex state "
                       f"size N, e.g. 256).")
    if not 0.0 <= self.r_min < self.r_max <= 1.0:
      raise ValueError(f"lru: need 0 <= r_min < r_max <= 1 for the init ring of |λ|; got "
                       f"r_min={self.r_min}, r_max={self.r_max} (e.g. 0.9, 0.999).")
    if not self.max_phase > 0.0:
      raise ValueError(f"lru: max_phase={self.max_phase} must be > 0 (2π, or π/10 for "
                       f"very long sequences).")

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> LRUCache:
    del max_len, dtype  # constant-size complex64 state
    self._check()
    return LRUCache(jnp.zeros((batch_size, self.d_state), jnp.complex64),
                    jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], LRUCache | None)."""
    del positions, deterministic
    self._check()
    b, t, d = x.shape
    n = self.d_state
    pd = self.param_dtype
    nu_log = self.param("nu_log", axes.param(nu_log_init(self.r_min, self.r_max), axes.STATE),
                        (n,), pd)
    theta_log = self.param("theta_log", axes.param(theta_log_init(self.max_phase), axes.STATE),
                           (n,), pd)
    gamma_log = self.param("gamma_log", axes.param(gamma_log_from(nu_log), axes.STATE), (n,), pd)
    b_par = self.param("B", axes.param(_complex_parts_init((2 * d) ** -0.5), axes.STATE,
                                       axes.EMBED, axes.NONE), (n, d, 2), pd)
    c_par = self.param("C", axes.param(_complex_parts_init(n ** -0.5), axes.EMBED, axes.STATE,
                                       axes.NONE), (d, n, 2), pd)
    d_par = self.param("D", axes.param(nn.initializers.normal(1.0), axes.EMBED), (d,), pd)
    nu, theta, gamma = (jnp.exp(p.astype(jnp.float32)) for p in (nu_log, theta_log, gamma_log))
    lam = jnp.exp(jax.lax.complex(-nu, theta))                           # [n]
    as_c = lambda p: jax.lax.complex(p[..., 0].astype(jnp.float32), p[..., 1].astype(jnp.float32))
    b_norm = gamma[:, None] * as_c(b_par)                                # [n, d]
    u = x.astype(self.dtype).astype(jnp.float32)
    bu = jnp.einsum("nd,btd->btn", b_norm, u.astype(jnp.complex64),
                    precision=_HIGHEST)                                  # [b, t, n]
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    a = segments.reset_decay(jnp.broadcast_to(lam, (b, t, n)), starts)
    hs, state = dispatch.linear_scan(a, bu, initial_state=None if cache is None else cache.state,
                                     chunk_size=self.chunk_size, impl=self.impl)
    y = jnp.einsum("dn,btn->btd", as_c(c_par), hs, precision=_HIGHEST).real  # [b, t, d]
    y = y + d_par.astype(jnp.float32) * u
    new_cache = None if cache is None else LRUCache(state, segments.last_segment_id(segment_ids, b))
    return y.astype(self.dtype), new_cache
