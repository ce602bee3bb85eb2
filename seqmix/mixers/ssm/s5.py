"""S5: simplified state space layer (Smith et al., "Simplified State Space Layers for Sequence
Modeling", ICLR 2023).

One multi-input multi-output SSM over all D = d_model channels with P states, diagonalised:

    Λ [P'] = the eigenvalues of HiPPO-N (HiPPO-LegS's normal part) of size P/J, repeated for J
        blocks (a block-diagonal init); conjugate symmetry keeps P' = P/2 listed states
    B̃ = V⁻¹ B [P', D], B ~ LecunNormal [P, D];  C̃ = C V [D, P'], C ~ CN (LecunNormal parts);
        V the block-diagonal eigenvectors;  D ~ N(0, 1);  Δ [P'] ~ LogUniform[dt_min, dt_max]
    ZOH:      Ā = e^{ΛΔ}, B̄ = (Ā - 1)/Λ · B̃     bilinear: Ā = (1 + ΛΔ/2)/(1 - ΛΔ/2),
                                                          B̄ = Δ/(1 - ΛΔ/2) · B̃
    x_t = Ā ⊙ x_{t-1} + B̄ u_t   [P'] complex;  y_t = 2 Re(C̃ x_t) + D ⊙ u_t
    out = y' ⊙ σ(W y'), y' = GELU(y)             (S5's "half_glu1" output; `output` field)

Both the parallel form and decoding run the recurrence through `seqmix.ops.scan.linear_scan`
(complex), the parallel scan of the paper; packed documents reset it (a_t = 0) at document starts.
The state is [B, P'] complex64.

Re Λ is learned directly, clipped to <= -1e-4 when `clip_eigs` (the official code's option that
keeps the SSM stable; the paper's default learns it unclipped).
"""

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import segments
from seqmix.mixers.ssm import _common
from seqmix.ops import ssm_kernels
from seqmix.parallel import axes
from seqmix.parallel import dispatch


class S5Cache(NamedTuple):
  state: jax.Array  # [B, P'] complex64 (P' = d_state / 2 listed states)
  seg: jax.Array    # [B] int32 segment id of the last token seen (-1 before the first)


def hippo_n_blocks(d_state: int, blocks: int):
  """(Λ [P'] complex128, V [P, P'] block-diagonal eigenvectors) of the J-block HiPPO-N init."""
  lam, _, _, v = ssm_kernels.dplr_legs(d_state // blocks, conj=True)   # [bs/2], [bs, bs/2]
  return np.tile(lam, blocks), np.kron(np.eye(blocks), v)             # [p, p'] block diagonal


def _b_tilde_init(v):
  """B̃ = V⁻¹ B as [P', D, 2], B ~ LecunNormal [P, D] (fan-in P, as the paper's code)."""
  vinv = v.conj().T                                                    # V unitary: V⁻¹ = V^*

  def init(key, shape, dtype=jnp.float32):
    p2, d, _ = shape
    b = nn.initializers.lecun_normal()(key, (2 * p2, d), jnp.float32)  # [p, d]
    bt = jnp.asarray(vinv, jnp.complex64) @ b.astype(jnp.complex64)    # [p', d]
    return jnp.stack([bt.real, bt.imag], -1).astype(dtype)
  return init


def _c_tilde_init(v):
  """C̃ = C V as [D, P', 2], C [D, P] complex with LecunNormal (fan-in P) real and imag parts."""
  def init(key, shape, dtype=jnp.float32):
    d, p2, _ = shape
    parts = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)(key, (2, d, 2 * p2))
    c = jax.lax.complex(parts[0], parts[1])                             # [d, p]
    ct = c @ jnp.asarray(v, jnp.complex64)                              # [d, p']
    return jnp.stack([ct.real, ct.imag], -1).astype(dtype)
  return init


@registry.register(
    "s5", paper="Simplified State Space Layers for Sequence Modeling",
    year=2023, venue="ICLR", family="ssm", op="scan.linear_scan",
    parents=("s4d",), constant_state=True,
    test_kwargs={"d_state": 16, "blocks": 2}, sequence_parallel=True)
class S5(MixerBase):
  """S5 layer (MIMO diagonal SSM).  x [B, T, D] -> y [B, T, D].

  d_state: P, the SSM's state size (P/2 conjugate pairs listed).
  blocks: J, HiPPO-N blocks of the init (P/J must be even).
  disc: "zoh" | "bilinear" discretisation.
  dt_min, dt_max: range of the log-uniform init of the per-state step Δ.
  clip_eigs: clip Re Λ to <= -1e-4 (stability).
  output: "half_glu" (GELU then y ⊙ σ(W y), S5's half_glu1) | "glu" | "linear".
  impl, chunk_size: `linear_scan` impl and chunk size.
  """
  d_state: int = 64
  blocks: int = 1
  disc: str = "zoh"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  clip_eigs: bool = True
  output: str = "half_glu"
  impl: str = "auto"
  chunk_size: int = 64

  def _check(self):
    _common.check_at_least("d_state", self.d_state)
    _common.check_at_least("blocks", self.blocks)
    if self.d_state % self.blocks or (self.d_state // self.blocks) % 2:
      raise ValueError(f"d_state={self.d_state} must split into blocks={self.blocks} blocks of "
                       f"an even size (conjugate pairs); e.g. d_state="
                       f"{2 * self.blocks * max(1, math.ceil(self.d_state / (2 * self.blocks)))}.")
    _common.check_choice("disc", self.disc, ssm_kernels.DISCRETISATIONS)
    _common.check_step_range(self.dt_min, self.dt_max)
    _common.check_choice("output", self.output, _common.OUTPUTS)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> S5Cache:
    del max_len, dtype  # constant-size complex64 state
    self._check()
    return S5Cache(jnp.zeros((batch_size, self.d_state // 2), jnp.complex64),
                   jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], S5Cache | None)."""
    del positions, deterministic
    self._check()
    b, t, d = x.shape
    p2 = self.d_state // 2
    lam0, v = hippo_n_blocks(self.d_state, self.blocks)
    pd = self.param_dtype
    lam_re = self.param("lambda_re", axes.param(_common.constant_init(lam0.real), axes.STATE),
                        (p2,), pd).astype(jnp.float32)
    lam_im = self.param("lambda_im", axes.param(_common.constant_init(lam0.imag), axes.STATE),
                        (p2,), pd).astype(jnp.float32)
    b_t = self.param("b", axes.param(_b_tilde_init(v), axes.STATE, axes.EMBED, axes.NONE),
                     (p2, d, 2), pd)
    c_t = self.param("c", axes.param(_c_tilde_init(v), axes.EMBED, axes.STATE, axes.NONE),
                     (d, p2, 2), pd)
    skip = self.param("d", axes.param(nn.initializers.normal(1.0), axes.EMBED), (d,), pd)
    log_step = self.param("log_step", axes.param(
        _common.log_step_init(self.dt_min, self.dt_max), axes.STATE), (p2,), pd)
    if self.clip_eigs:
      lam_re = jnp.minimum(lam_re, -1e-4)
    lam = jax.lax.complex(lam_re, lam_im)                                # [p']
    step = jnp.exp(log_step.astype(jnp.float32))
    if self.disc == "zoh":
      a_bar = jnp.exp(lam * step)
      b_scale = (a_bar - 1.0) / lam
    else:
      back = 1.0 / (1.0 - lam * step / 2.0)
      a_bar, b_scale = back * (1.0 + lam * step / 2.0), back * step
    b_bar = b_scale[:, None] * _common.as_complex(b_t)                   # [p', d]
    u = x.astype(self.dtype)
    bu = jnp.einsum("pd,btd->btp", b_bar, u.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)                 # [b, t, p']
    starts, last_seg = _common.starts_and_seg(segment_ids, cache, b)
    a = segments.reset_decay(jnp.broadcast_to(a_bar, (b, t, p2)), starts)
    xs, state = dispatch.linear_scan(a, bu, initial_state=None if cache is None else cache.state,
                                     chunk_size=self.chunk_size, impl=self.impl)
    y = 2.0 * jnp.einsum("dp,btp->btd", _common.as_complex(c_t), xs,
                         precision=jax.lax.Precision.HIGHEST).real       # [b, t, d]
    y = jax.nn.gelu(y + skip.astype(jnp.float32) * u.astype(jnp.float32)).astype(self.dtype)
    y = _common.SSMOutput(d, self.output, dtype=self.dtype, param_dtype=pd, name="output")(y)
    return y, None if cache is None else S5Cache(state, last_seg)
