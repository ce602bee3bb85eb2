"""Feature maps φ for linear attention, and the normalised attention they feed.

Each map turns queries/keys `[B, T, H, d]` into non-negative (or, for the Taylor map, positive
kernel-valued) features `[B, T, H, K]` such that φ(q)·φ(k) approximates or replaces a softmax
score. Mixers then run `normalized_linear_attention`:

    y_t = Σ_{s<=t} φ(q_t)·φ(k_s) v_s / (Σ_{s<=t} φ(q_t)·φ(k_s) + eps)

through ONE `seqmix.ops.linear_attention.gla` call (scale 1, no decay): v gets a column of ones
appended, so the state `[K, V + 1]` carries Σ φ(k)ᵀ v in its first V columns and the normaliser
Σ φ(k) in the last. Packed documents reset the state with a `-inf` gate at each document's
first token.

Maps (d = the input width of the map):
  taylor_exp        Based: [1, x / d^¼, x⊗x / (√2·√d)], so φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d),
                    the 2nd-order Taylor expansion of exp(q·k/√d).
  quadratic         x⊗x in its compact form (upper triangle, off-diagonal × √2): d(d+1)/2
                    features with quadratic(q)·quadratic(k) = (q·k)² exactly (ReBased, Taylor).
  hedgehog          Hedgehog: [softmax(x W + b), softmax(−(x W + b))], W per head (a module).
  favor_positive    Performer FAVOR+: exp(w_i·x − |x|²/2) / √m with fixed random w_i.
  orthogonal_gaussian  the FAVOR+ projection: blocks of orthogonal rows, Gaussian row norms.
  cos_reweight      cosFormer: [relu(x) cos(π i / 2M), relu(x) sin(π i / 2M)] at position i.
"""

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqmix.mixers.common import segments
from seqmix.parallel import axes
from seqmix.parallel import dispatch


class FeatureMapCache(NamedTuple):
  """Decoding cache of a feature-map linear attention (constant size)."""
  state: jax.Array  # [B, H, K, V + 1] float32: Σ φ(k)ᵀ [v, 1]
  seg: jax.Array    # [B] int32 segment id of the last token seen (−1 before any)


def init_feature_map_cache(batch_size: int, heads: int, features: int, value_dim: int):
  """Zero state `[B, H, K, V + 1]` and no segment seen."""
  return FeatureMapCache(jnp.zeros((batch_size, heads, features, value_dim + 1), jnp.float32),
                         jnp.full((batch_size,), -1, jnp.int32))


def normalized_linear_attention(phi_q, phi_k, v, *, eps: float, segment_ids=None, cache=None,
                                chunk_size: int = 64, impl: str = "auto"):
  """Causal normalised linear attention over feature-mapped queries and keys.

  phi_q, phi_k: `[B, T, H, K]` features (non-negative sums in the denominator: see the map).
  v: `[B, T, H, V]`. eps: added to the denominator. segment_ids: `[B, T]` or None.
  cache: a `FeatureMapCache` to continue from, or None (parallel form).
  chunk_size, impl: passed to `linear_attention.gla` unchanged.
  Returns (y `[B, T, H, V]` in v's dtype, new `FeatureMapCache` or None).
  """
  b, t, h, _ = v.shape
  v1 = jnp.concatenate([v, jnp.ones((b, t, h, 1), v.dtype)], axis=-1)   # [b, t, h, v + 1]
  starts = segments.segment_starts(segment_ids,
                                   cache_last_id=None if cache is None else cache.seg)
  g = segments.reset_log_gate(None, starts, shape=(b, t, h))
  o, state = dispatch.gla(phi_q, phi_k, v1, g, scale=1.0,
                          initial_state=None if cache is None else cache.state,
                          chunk_size=chunk_size, impl=impl)
  num, den = o[..., :-1].astype(jnp.float32), o[..., -1:].astype(jnp.float32)
  y = (num / (den + eps)).astype(v.dtype)                               # [b, t, h, v]
  new_cache = None if cache is None else FeatureMapCache(
      state, segments.last_segment_id(segment_ids, b))
  return y, new_cache


def elu_feature_map(x):
  """φ(x) = elu(x) + 1 > 0 (Katharopoulos et al., eq. 7; TransNormer's NormAttention kernel)."""
  return jax.nn.elu(x) + 1.0


def quadratic(x):
  """Compact x⊗x: `[..., d]` -> `[..., d(d+1)/2]` with quadratic(q)·quadratic(k) = (q·k)².

  The diagonal x_i² once, each pair i < j as √2 x_i x_j (the symmetric outer product without
  its duplicate half).
  """
  d = x.shape[-1]
  iu, ju = jnp.triu_indices(d, k=1)
  diag = jnp.square(x)
  off = x[..., iu] * x[..., ju] * jnp.asarray(math.sqrt(2.0), x.dtype)
  return jnp.concatenate([diag, off], axis=-1)


def quadratic_size(d: int) -> int:
  return d * (d + 1) // 2


def taylor_exp(x):
  """Based's 2nd-order Taylor map: `[..., d]` -> `[..., 1 + d + d(d+1)/2]`.

  φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d) >= 1/2 (a quadratic in q·k with no real root), so
  the normaliser never vanishes.
  """
  d = x.shape[-1]
  ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
  return jnp.concatenate([ones, x * d ** -0.25, quadratic(x) * (2.0 * d) ** -0.5], axis=-1)


def taylor_exp_size(d: int) -> int:
  return 1 + d + quadratic_size(d)


class HedgehogFeatureMap(nn.Module):
  """Hedgehog's learnable map per head: [softmax(x W_h + b_h), softmax(−(x W_h + b_h))].

  x `[B, T, H, d]` -> `[B, T, H, 2F]`; each softmax runs over its F features, so every feature
  lies in (0, 1) and φ(q)·φ(k) > 0.

  features: F (the paper uses F = d, the head dim).
  use_bias: learn b_h `[H, F]` (zero at init).
  identity_init: W_h = I at init (needs F == d; otherwise lecun-normal), as in the paper's
    conversion setting and fla's HedgehogFeatureMap; the map then starts as [softmax(x),
    softmax(−x)].
  """
  features: int
  use_bias: bool = True
  identity_init: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, d = x.shape[-2:]
    if self.identity_init and self.features != d:
      raise ValueError(f"HedgehogFeatureMap: identity_init needs features == head dim, got "
                       f"features={self.features} and head dim {d}; set features={d} or "
                       "identity_init=False.")

    def init(key, shape, dtype=jnp.float32):
      if self.identity_init:
        return jnp.broadcast_to(jnp.eye(d, dtype=dtype), shape)
      return nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))(
          key, shape, dtype)

    w = self.param("kernel", axes.param(init, axes.HEADS, axes.KV, axes.STATE),
                   (h, d, self.features), self.param_dtype)
    z = jnp.einsum("...hd,hdf->...hf", x.astype(self.dtype), w.astype(self.dtype))  # [b, t, h, f]
    if self.use_bias:
      bias = self.param("bias", axes.param(nn.initializers.zeros, axes.HEADS, axes.STATE),
                        (h, self.features), self.param_dtype)
      z = z + bias.astype(self.dtype)
    z = z.astype(jnp.float32)
    return jnp.concatenate([jax.nn.softmax(z, axis=-1), jax.nn.softmax(-z, axis=-1)],
                           axis=-1).astype(self.dtype)                     # [b, t, h, 2f]


@functools.lru_cache(maxsize=64)
def orthogonal_gaussian(seed: tuple[int, ...], m: int, d: int) -> np.ndarray:
  """FAVOR+ projection `[m, d]` float32: stacked d×d orthogonal blocks, rows rescaled to the norms
  of i.i.d. Gaussian rows (Choromanski et al. 2021, sec. 2.4; the official `scaling=0` option),
  so each row is marginally N(0, I_d) while rows within a block are exactly orthogonal.

  A host-side constant drawn from `np.random.default_rng(seed)`: the same seed gives the same
  matrix in every call, every jit trace and on every backend, and it is baked into the traced
  program (no variable, nothing for an optimiser to touch).
  """
  rng = np.random.default_rng(list(seed))
  blocks = []
  for _ in range(-(-m // d)):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    blocks.append(q.T)                                                 # orthonormal rows
  w = np.concatenate(blocks, axis=0)[:m]                               # [m, d]
  norms = np.linalg.norm(rng.standard_normal((m, d)), axis=-1)
  return (w * norms[:, None]).astype(np.float32)


def favor_positive(x, projection, *, is_query: bool, eps: float = 1e-4):
  """Performer's positive random features of softmax(q·k/√d).

  x `[B, T, H, d]`, projection `[m, d]` -> `[B, T, H, m]`:
      x' = x / d^¼,  φ(x') = (exp(w_i·x' − |x'|²/2 − c) + eps) / √m
  with E[φ(q')·φ(k')] ∝ exp(q·k/√d). The stabiliser c is, for queries, the max over the
  token's own m features (a per-query factor: it cancels between numerator and denominator up
  to `eps`); keys use c = 0. The official code subtracts the max over ALL keys of the sequence,
  which would let a future token change a past output (not causal, and not reproducible when
  decoding); w_i·x' − |x'|²/2 <= |w_i|²/2 ≈ d/2 bounds the keys' exponent instead.
  """
  d = x.shape[-1]
  m = projection.shape[0]
  x = x.astype(jnp.float32) * d ** -0.25
  proj = jnp.einsum("bthd,md->bthm", x, projection.astype(jnp.float32))  # [b, t, h, m]
  sq = 0.5 * jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  if is_query:
    proj = proj - jnp.max(proj, axis=-1, keepdims=True)
  return (jnp.exp(proj - sq) + eps) * m ** -0.5


def cos_reweight(x, positions, horizon: int):
  """cosFormer's re-weighted ReLU features.

  x `[B, T, H, d]`, positions `[B, T]` int, horizon M -> `[B, T, H, 2d]`:
      φ(x_i) = [relu(x_i) cos(π i / 2M), relu(x_i) sin(π i / 2M)]
  so φ(q_i)·φ(k_j) = relu(q_i)·relu(k_j) cos(π (i − j) / 2M): the decomposition of the paper's
  cos re-weighting, which stays in (0, 1] while 0 <= i − j < M.
  """
  angle = (jnp.pi / (2.0 * horizon)) * positions.astype(jnp.float32)      # [b, t]
  r = jax.nn.relu(x.astype(jnp.float32))
  cos, sin = jnp.cos(angle)[:, :, None, None], jnp.sin(angle)[:, :, None, None]
  return jnp.concatenate([r * cos, r * sin], axis=-1).astype(x.dtype)      # [b, t, h, 2d]
