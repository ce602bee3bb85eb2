"""Pallas kernels for Mamba's selective scan (S6) (GPU, Triton lowering).

    Δ_t = softplus(delta_t + bias) (or delta_t + bias);   dA_t = exp(Δ_t ⊗ A) · keep_t
    h_t = dA_t ⊙ h_{t-1} + (Δ_t u_t) ⊗ B_t;   y_t = h_t C_t + Dskip ⊙ u_t

Layout: u, delta, y `[B, T, D]`; B, C `[B, T, N]`; A `[D, N]`; keep `[B, T]` (0 at a reset,
1 elsewhere); T a multiple of `block_t`, D of `block_d`, N a power of two (ops.py pads; rows
at or past `t_real` get Δ = 0, an identity step). One program per (batch row, block of
`block_d` channels) keeps its `[block_d, N]` state in registers for the whole sequence.
Time goes in chunks of `block_t` rows whose loads are issued together (and, with `prefetch`,
one chunk ahead), as in the linear-scan kernel.

The forward used for gradients also stores the state entering every chunk,
`[B, T / block_t, D, N]`. The backward walks the chunks in reverse: it reloads a chunk's
entering state, recomputes the chunk's `block_t` states in registers, then runs the reverse
recurrence
    gh_t = dy_t ⊗ C_t + dA_{t+1} ⊙ gh_{t+1}            (from gh = dh_T)
    dC_t = Σ_d dy_t h_t,   dB_t = Σ_d gh_t (Δ_t u_t),   du_t = Δ_t Σ_n gh_t B_t + Dskip dy_t
    dΔ_t = u_t Σ_n gh_t B_t + Σ_n gh_t ⊙ A ⊙ dA_t ⊙ h_{t-1},   dA += Σ_t Δ_t gh_t dA_t h_{t-1}
and chains dΔ through the softplus (σ(delta + bias)). dB and dC are written per channel block
(`[B, T, D / block_d, N]`, summed by ops.py); dA, dDskip, dbias per batch row.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class SelectiveScanConfig:
  """Static block sizes and the backward variant.

  block_d: channels per program (a power of two).
  block_t: time rows per forward chunk (loads in flight together). With backward="v1" also
    the checkpoint interval and the backward's recompute span (it then holds block_t + 1
    states and block_t exp tiles of [block_d, N] in registers).
  num_warps: warps per program.
  prefetch: issue the next chunk's loads before scanning the current one (forward only).
  backward: "v1" (recompute span block_t, keeps every step's exp(ΔA)) or "v2" (recompute
    span bwd_block_t, keeps only the states: exp(ΔA) is recomputed in the reverse sweep and
    dC is reduced in the recompute sweep, so fewer registers are live; see NOTES.md).
  bwd_block_t: v2's checkpoint interval and recompute span; a multiple or a divisor of
    block_t.
  """
  block_d: int = 32
  block_t: int = 16
  num_warps: int = 4
  prefetch: bool = True
  backward: str = "v1"
  bwd_block_t: int = 8

  def __post_init__(self):
    if self.block_d < 1 or self.block_d & (self.block_d - 1):
      raise ValueError(f"SelectiveScanConfig: block_d={self.block_d} must be a power of two.")
    if self.block_t < 1 or self.bwd_block_t < 1:
      raise ValueError(f"SelectiveScanConfig: block_t={self.block_t} and bwd_block_t="
                       f"{self.bwd_block_t} must be >= 1.")
    if self.backward not in ("v1", "v2"):
      raise ValueError(f"SelectiveScanConfig: backward={self.backward!r}; choose 'v1' or 'v2'.")
    big, small = max(self.block_t, self.bwd_block_t), min(self.block_t, self.bwd_block_t)
    if self.backward == "v2" and big % small:
      raise ValueError(f"SelectiveScanConfig: bwd_block_t={self.bwd_block_t} must divide or "
                       f"be a multiple of block_t={self.block_t}.")

  @property
  def ckpt_t(self) -> int:
    """Rows between saved states (the backward's recompute span)."""
    return self.block_t if self.backward == "v1" else self.bwd_block_t

  @property
  def t_multiple(self) -> int:
    """T is padded to a multiple of this."""
    return max(self.block_t, self.ckpt_t)


@dataclasses.dataclass(frozen=True)
class Static:
  """Per-call static facts: the unpadded length, the softplus and reset switches."""
  t_real: int
  softplus: bool
  has_reset: bool


def _softplus(x):
  # As mamba_ssm: x itself above 20, where log1p(exp(x)) = x in float32.
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _delta(st, dl, bias, t):
  """Δ [block_d] of row t; 0 past the real length (identity step)."""
  x = dl + bias
  dt = _softplus(x) if st.softplus else x
  return jnp.where(t < st.t_real, dt, 0.0)


def _load_rows(st, refs, b, t0, n, cols):
  """Rows t0..t0+n-1: (u, delta, B, C, keep[, dy]) each, float32; independent loads."""
  u_ref, dl_ref, b_ref, c_ref, keep_ref = refs[:5]
  dy_ref = refs[5] if len(refs) > 5 else None
  rows = []
  for i in range(n):
    t = t0 + i
    row = [u_ref[b, t, cols].astype(jnp.float32), dl_ref[b, t, cols].astype(jnp.float32),
           b_ref[b, t, :].astype(jnp.float32), c_ref[b, t, :].astype(jnp.float32),
           keep_ref[b, t].astype(jnp.float32) if st.has_reset else None]
    if dy_ref is not None:
      row.append(dy_ref[b, t, cols].astype(jnp.float32))
    rows.append(tuple(row))
  return tuple(rows)


def _step(st, a, bias, h, row, t):
  """One recurrence step -> (h_t, Δ_t, dA_t)."""
  u, dl, bm, _, keep = row[:5]
  dt = _delta(st, dl, bias, t)
  d_a = jnp.exp(dt[:, None] * a)  # [block_d, n]
  if st.has_reset:
    d_a = d_a * keep
  h = d_a * h + (dt * u)[:, None] * bm[None, :]
  return h, dt, d_a


def _fwd_kernel(cfg, st, save, u_ref, dl_ref, a_ref, b_ref, c_ref, dsk_ref, bias_ref, h0_ref,
                keep_ref, y_ref, ht_ref, *hs_ref):
  b, j = pl.program_id(0), pl.program_id(1)
  tc = cfg.block_t
  cols = pl.ds(j * cfg.block_d, cfg.block_d)
  n_chunks = u_ref.shape[1] // tc
  a = a_ref[cols, :].astype(jnp.float32)  # [block_d, n]
  bias = bias_ref[cols].astype(jnp.float32)
  dsk = dsk_ref[cols].astype(jnp.float32)
  ins = (u_ref, dl_ref, b_ref, c_ref, keep_ref)
  load = lambda c: _load_rows(st, ins, b, c * tc, tc, cols)

  ck = cfg.ckpt_t

  def scan_chunk(c, h, rows):
    if save and ck == tc:
      hs_ref[0][b, c, cols, :] = h
    elif save and ck > tc:  # one saved state every ck // tc chunks
      per = ck // tc

      @pl.when((c // per) * per == c)
      def _():
        hs_ref[0][b, c // per, cols, :] = h
    for r in range(tc):
      if save and ck < tc and r % ck == 0:  # tc // ck saved states per chunk
        hs_ref[0][b, c * (tc // ck) + r // ck, cols, :] = h
      t = c * tc + r
      h, _, _ = _step(st, a, bias, h, rows[r], t)
      y = jnp.sum(h * rows[r][3][None, :], axis=1) + dsk * rows[r][0]
      y_ref[b, t, cols] = y.astype(y_ref.dtype)
    return h

  h = h0_ref[b, cols, :].astype(jnp.float32)
  if cfg.prefetch:
    def body(c, carry):
      h, rows = carry
      nxt = load(jnp.minimum(c + 1, n_chunks - 1))  # the last chunk reloads itself, unused
      return scan_chunk(c, h, rows), nxt
    h, _ = lax.fori_loop(0, n_chunks, body, (h, load(0)))
  else:
    h = lax.fori_loop(0, n_chunks, lambda c, h: scan_chunk(c, h, load(c)), h)
  ht_ref[b, cols, :] = h


def _bwd_kernel(cfg, st, u_ref, dl_ref, a_ref, b_ref, c_ref, dsk_ref, bias_ref, keep_ref, hs_ref,
                dy_ref, dht_ref, du_ref, ddl_ref, dbp_ref, dcp_ref, da_ref, ddsk_ref, dbias_ref,
                dh0_ref):
  b, j = pl.program_id(0), pl.program_id(1)
  tc = cfg.block_t
  cols = pl.ds(j * cfg.block_d, cfg.block_d)
  n_chunks = u_ref.shape[1] // tc
  a = a_ref[cols, :].astype(jnp.float32)
  bias = bias_ref[cols].astype(jnp.float32)
  dsk = dsk_ref[cols].astype(jnp.float32)
  ins = (u_ref, dl_ref, b_ref, c_ref, keep_ref, dy_ref)

  def body(k, carry):
    g, da_acc, ddsk_acc, dbias_acc = carry
    c = n_chunks - 1 - k
    t0 = c * tc
    rows = _load_rows(st, ins, b, t0, tc, cols)
    h = hs_ref[b, c, cols, :]
    states, steps = [h], []
    for r in range(tc):
      h, dt, d_a = _step(st, a, bias, h, rows[r], t0 + r)
      states.append(h)
      steps.append((dt, d_a))
    for r in reversed(range(tc)):
      t = t0 + r
      u, dl, bm, cm, _, dy = rows[r]
      dt, d_a = steps[r]
      gh = g + dy[:, None] * cm[None, :]  # [block_d, n]
      hp = states[r]
      dcp_ref[b, t, j, :] = jnp.sum(dy[:, None] * states[r + 1], axis=0)
      dbp_ref[b, t, j, :] = jnp.sum(gh * (dt * u)[:, None], axis=0)
      gh_b = jnp.sum(gh * bm[None, :], axis=1)  # [block_d]
      du_ref[b, t, cols] = (dt * gh_b + dsk * dy).astype(du_ref.dtype)
      through_a = gh * d_a * hp  # [block_d, n]
      ddt = u * gh_b + jnp.sum(through_a * a, axis=1)
      da_acc = da_acc + through_a * dt[:, None]
      ddsk_acc = ddsk_acc + dy * u
      if st.softplus:
        ddt = ddt / (1.0 + jnp.exp(-(dl + bias)))  # softplus' = sigmoid
      ddt = jnp.where(t < st.t_real, ddt, 0.0)
      dbias_acc = dbias_acc + ddt
      ddl_ref[b, t, cols] = ddt.astype(ddl_ref.dtype)
      g = d_a * gh
    return g, da_acc, ddsk_acc, dbias_acc

  zeros_d = jnp.zeros((cfg.block_d,), jnp.float32)
  init = (dht_ref[b, cols, :].astype(jnp.float32), jnp.zeros_like(a), zeros_d, zeros_d)
  g, da_acc, ddsk_acc, dbias_acc = lax.fori_loop(0, n_chunks, body, init)
  dh0_ref[b, cols, :] = g
  da_ref[b, cols, :] = da_acc
  ddsk_ref[b, cols] = ddsk_acc
  dbias_ref[b, cols] = dbias_acc


def _bwd_kernel_v2(cfg, st, u_ref, dl_ref, a_ref, b_ref, c_ref, dsk_ref, bias_ref, keep_ref,
                   hs_ref, dy_ref, dht_ref, du_ref, ddl_ref, dbp_ref, dcp_ref, da_ref, ddsk_ref,
                   dbias_ref, dh0_ref):
  """The v1 recurrence with fewer live registers (outputs and formulas as _bwd_kernel).

  Per span of `bwd_block_t` rows: the recompute sweep keeps only the entering states h_{t-1}
  (one [block_d, N] tile per row) and Δ_t, and reduces dC_t = Σ_d dy_t h_t there, where h_t
  is at hand; the reverse sweep recomputes exp(Δ_t A) instead of keeping it.
  """
  b, j = pl.program_id(0), pl.program_id(1)
  tc = cfg.ckpt_t
  cols = pl.ds(j * cfg.block_d, cfg.block_d)
  n_chunks = u_ref.shape[1] // tc
  a = a_ref[cols, :].astype(jnp.float32)
  bias = bias_ref[cols].astype(jnp.float32)
  dsk = dsk_ref[cols].astype(jnp.float32)
  ins = (u_ref, dl_ref, b_ref, c_ref, keep_ref, dy_ref)

  def body(k, carry):
    g, da_acc, ddsk_acc, dbias_acc = carry
    c = n_chunks - 1 - k
    t0 = c * tc
    rows = _load_rows(st, ins, b, t0, tc, cols)
    h = hs_ref[b, c, cols, :]
    prev, dts = [], []
    for r in range(tc):
      prev.append(h)
      h, dt, _ = _step(st, a, bias, h, rows[r], t0 + r)
      dts.append(dt)
      dcp_ref[b, t0 + r, j, :] = jnp.sum(rows[r][5][:, None] * h, axis=0)
    for r in reversed(range(tc)):
      t = t0 + r
      u, dl, bm, cm, keep, dy = rows[r]
      dt = dts[r]
      d_a = jnp.exp(dt[:, None] * a)
      if st.has_reset:
        d_a = d_a * keep
      gh = g + dy[:, None] * cm[None, :]  # [block_d, n]
      dbp_ref[b, t, j, :] = jnp.sum(gh * (dt * u)[:, None], axis=0)
      gh_b = jnp.sum(gh * bm[None, :], axis=1)  # [block_d]
      du_ref[b, t, cols] = (dt * gh_b + dsk * dy).astype(du_ref.dtype)
      through_a = gh * d_a * prev[r]  # [block_d, n]
      ddt = u * gh_b + jnp.sum(through_a * a, axis=1)
      da_acc = da_acc + through_a * dt[:, None]
      ddsk_acc = ddsk_acc + dy * u
      if st.softplus:
        ddt = ddt / (1.0 + jnp.exp(-(dl + bias)))  # softplus' = sigmoid
      ddt = jnp.where(t < st.t_real, ddt, 0.0)
      dbias_acc = dbias_acc + ddt
      ddl_ref[b, t, cols] = ddt.astype(ddl_ref.dtype)
      g = d_a * gh
    return g, da_acc, ddsk_acc, dbias_acc

  zeros_d = jnp.zeros((cfg.block_d,), jnp.float32)
  init = (dht_ref[b, cols, :].astype(jnp.float32), jnp.zeros_like(a), zeros_d, zeros_d)
  g, da_acc, ddsk_acc, dbias_acc = lax.fori_loop(0, n_chunks, body, init)
  dh0_ref[b, cols, :] = g
  da_ref[b, cols, :] = da_acc
  ddsk_ref[b, cols] = ddsk_acc
  dbias_ref[b, cols] = dbias_acc


def _params(cfg, interpret):
  return None if interpret else plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=1)


def _grid(cfg, u):
  return (u.shape[0], u.shape[2] // cfg.block_d)


def ss_fwd(cfg, st, save, interpret, u, dl, a, bm, cm, dsk, bias, h0, keep):
  """-> (y [B, T, D] f32, h_T [B, D, N], and with `save` the chunk-entry states)."""
  bsz, t, d = u.shape
  n = a.shape[1]
  out_shape = [jax.ShapeDtypeStruct((bsz, t, d), jnp.float32),
               jax.ShapeDtypeStruct((bsz, d, n), jnp.float32)]
  if save:
    out_shape.append(jax.ShapeDtypeStruct((bsz, t // cfg.ckpt_t, d, n), jnp.float32))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg, st, save), out_shape=tuple(out_shape),
      grid=_grid(cfg, u), interpret=interpret, compiler_params=_params(cfg, interpret),
      name="selective_scan_fwd")(u, dl, a, bm, cm, dsk, bias, h0, keep)


def ss_bwd(cfg, st, interpret, u, dl, a, bm, cm, dsk, bias, keep, hs, dy, dht):
  """-> (du, ddelta, dB partials, dC partials, dA per row, dDskip per row, dbias per row, dh0)."""
  bsz, t, d = u.shape
  n = a.shape[1]
  f32 = jnp.float32
  nd = d // cfg.block_d
  out_shape = (jax.ShapeDtypeStruct((bsz, t, d), f32), jax.ShapeDtypeStruct((bsz, t, d), f32),
               jax.ShapeDtypeStruct((bsz, t, nd, n), f32),
               jax.ShapeDtypeStruct((bsz, t, nd, n), f32),
               jax.ShapeDtypeStruct((bsz, d, n), f32), jax.ShapeDtypeStruct((bsz, d), f32),
               jax.ShapeDtypeStruct((bsz, d), f32), jax.ShapeDtypeStruct((bsz, d, n), f32))
  return pl.pallas_call(
      functools.partial(_bwd_kernel if cfg.backward == "v1" else _bwd_kernel_v2, cfg, st),
      out_shape=out_shape,
      grid=_grid(cfg, u), interpret=interpret, compiler_params=_params(cfg, interpret),
      name="selective_scan_bwd")(u, dl, a, bm, cm, dsk, bias, keep, hs, dy, dht)
