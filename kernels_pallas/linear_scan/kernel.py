"""Pallas kernels for the diagonal recurrence h_t = a_t h_{t-1} + x_t (GPU, Triton lowering).

Layout: every array is `[B, T, D]` float32 (a complex array travels as two float32 arrays, its
real and imaginary parts, a "part" each), with T a multiple of `block_t` and D a multiple of
`block_d` (ops.py pads). One program per (batch row, block of `block_d` channels) walks the
whole sequence with the `[block_d]` state in registers. Time goes in tiles of `block_t` rows:
the loads of a tile are issued together (a static unroll of independent row loads, so they are
in flight at once instead of one load latency per time step), then the tile is scanned in
registers and its rows stored. With `prefetch`, the next tile's loads are issued before the
current tile is scanned (a register double buffer), so the load latency overlaps the scan.

The backward kernel is the same walk in reverse time:
    g_t = dh_t + conj(a_{t+1}) g_{t+1}     (g_{T-1} starts from dh_T, the final-state cotangent)
    dx_t = g_t,   da_t = g_t conj(h_{t-1}),   dh_{-1} = conj(a_0) g_0
written on the real and imaginary parts (conj because the transpose of the real-linear map
(h_re, h_im) -> (a_re h_re - a_im h_im, a_re h_im + a_im h_re) is multiplication by conj(a)).
`a_{t+1}` is carried from the previous (later) row, so `a` is read once; `h_{t-1}` for a
tile's first row is one extra row load per tile.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class ScanConfig:
  """Static block sizes of the linear-scan kernels.

  block_d: channels per program (a power of two >= 32: one warp covers 32 lanes).
  block_t: time rows per tile (the rows whose loads are in flight together).
  num_warps: warps per program (None: block_d // 32, one channel per thread).
  prefetch: issue the next tile's loads before scanning the current one.
  """
  block_d: int = 32
  block_t: int = 32
  num_warps: int | None = None
  prefetch: bool = True

  def __post_init__(self):
    if self.block_d < 1 or self.block_d & (self.block_d - 1):
      raise ValueError(f"ScanConfig: block_d={self.block_d} must be a power of two (Triton "
                       f"tensors have power-of-two shapes).")
    if self.block_t < 1:
      raise ValueError(f"ScanConfig: block_t={self.block_t} must be >= 1.")

  @property
  def warps(self) -> int:
    return self.num_warps if self.num_warps is not None else max(1, self.block_d // 32)


def _mul(a, h, conj_a=False):
  """a * h on (re,) or (re, im) parts; conj(a) * h with conj_a."""
  if len(a) == 1:
    return (a[0] * h[0],)
  ar, ai = a
  hr, hi = h
  if conj_a:
    return (ar * hr + ai * hi, ar * hi - ai * hr)
  return (ar * hr - ai * hi, ar * hi + ai * hr)


def _mul_conj(g, h):
  """g * conj(h) on parts."""
  if len(g) == 1:
    return (g[0] * h[0],)
  gr, gi = g
  hr, hi = h
  return (gr * hr + gi * hi, gi * hr - gr * hi)


def _add(a, b):
  return tuple(u + v for u, v in zip(a, b))


def _rows(refs, b, t0, n, cols):
  """The n rows t0..t0+n-1 of every ref, each [block_d] float32: n independent loads."""
  return tuple(tuple(r[b, t0 + i, cols].astype(jnp.float32) for r in refs) for i in range(n))


def _fwd_kernel(cfg: ScanConfig, parts: int, *refs):
  a_refs, x_refs, h0_refs = refs[:parts], refs[parts:2 * parts], refs[2 * parts:3 * parts]
  h_refs, ht_refs = refs[3 * parts:4 * parts], refs[4 * parts:5 * parts]
  b, j = pl.program_id(0), pl.program_id(1)
  tc = cfg.block_t
  cols = pl.ds(j * cfg.block_d, cfg.block_d)
  n_tiles = h_refs[0].shape[1] // tc

  def load(i):
    return _rows(a_refs, b, i * tc, tc, cols), _rows(x_refs, b, i * tc, tc, cols)

  def scan_tile(i, h, tile):
    a_rows, x_rows = tile
    for r in range(tc):
      h = _add(_mul(a_rows[r], h), x_rows[r])
      for ref, v in zip(h_refs, h):
        ref[b, i * tc + r, cols] = v.astype(ref.dtype)
    return h

  h = tuple(r[b, cols].astype(jnp.float32) for r in h0_refs)
  if cfg.prefetch:
    def body(i, carry):
      h, tile = carry
      nxt = load(jnp.minimum(i + 1, n_tiles - 1))  # the last tile reloads itself, unused
      return scan_tile(i, h, tile), nxt
    h, _ = lax.fori_loop(0, n_tiles, body, (h, load(0)))
  else:
    h = lax.fori_loop(0, n_tiles, lambda i, h: scan_tile(i, h, load(i)), h)
  for ref, v in zip(ht_refs, h):
    ref[b, cols] = v


def _bwd_kernel(cfg: ScanConfig, parts: int, *refs):
  p = parts
  a_refs, h_refs, dh_refs = refs[:p], refs[p:2 * p], refs[2 * p:3 * p]
  dht_refs, h0_refs = refs[3 * p:4 * p], refs[4 * p:5 * p]
  dx_refs, da_refs, dh0_refs = refs[5 * p:6 * p], refs[6 * p:7 * p], refs[7 * p:8 * p]
  b, j = pl.program_id(0), pl.program_id(1)
  tc = cfg.block_t
  cols = pl.ds(j * cfg.block_d, cfg.block_d)
  n_tiles = h_refs[0].shape[1] // tc
  h0 = tuple(r[b, cols].astype(jnp.float32) for r in h0_refs)

  def load(i):
    t0 = i * tc
    # h_{t0-1}: the row before the tile (h_{-1} = h0 for the first tile).
    prev = tuple(jnp.where(t0 == 0, v0, r[b, jnp.maximum(t0 - 1, 0), cols].astype(jnp.float32))
                 for r, v0 in zip(h_refs, h0))
    return (_rows(a_refs, b, t0, tc, cols), _rows(h_refs, b, t0, tc, cols),
            _rows(dh_refs, b, t0, tc, cols), prev)

  def scan_tile(i, g, a_next, tile):
    a_rows, h_rows, dh_rows, prev = tile
    for r in reversed(range(tc)):
      g = _add(_mul(a_next, g, conj_a=True), dh_rows[r])
      hp = h_rows[r - 1] if r > 0 else prev
      da = _mul_conj(g, hp)
      for ref, v in zip(dx_refs, g):
        ref[b, i * tc + r, cols] = v.astype(ref.dtype)
      for ref, v in zip(da_refs, da):
        ref[b, i * tc + r, cols] = v.astype(ref.dtype)
      a_next = a_rows[r]
    return g, a_next

  g = tuple(r[b, cols].astype(jnp.float32) for r in dht_refs)
  one = (jnp.ones((cfg.block_d,), jnp.float32),) + (jnp.zeros((cfg.block_d,), jnp.float32),) * (p - 1)
  if cfg.prefetch:
    def body(k, carry):
      g, a_next, tile = carry
      i = n_tiles - 1 - k
      nxt = load(jnp.maximum(i - 1, 0))
      g, a_next = scan_tile(i, g, a_next, tile)
      return g, a_next, nxt
    g, a_next, _ = lax.fori_loop(0, n_tiles, body, (g, one, load(n_tiles - 1)))
  else:
    def body(k, carry):
      i = n_tiles - 1 - k
      return scan_tile(i, *carry, load(i))
    g, a_next = lax.fori_loop(0, n_tiles, body, (g, one))
  for ref, v in zip(dh0_refs, _mul(a_next, g, conj_a=True)):
    ref[b, cols] = v


def _params(cfg, interpret):
  if interpret:
    return None
  return plgpu.CompilerParams(num_warps=cfg.warps, num_stages=1)


def scan_fwd(cfg: ScanConfig, interpret: bool, a, x, h0):
  """Forward on parts: a, x tuples of [B, T, D] float32, h0 of [B, D] -> (h parts, h_T parts)."""
  p = len(a)
  bsz, t, d = a[0].shape
  state = jax.ShapeDtypeStruct((bsz, d), jnp.float32)
  out_shape = (jax.ShapeDtypeStruct((bsz, t, d), jnp.float32),) * p + (state,) * p
  out = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg, p), out_shape=out_shape,
      grid=(bsz, d // cfg.block_d), interpret=interpret, compiler_params=_params(cfg, interpret),
      name="linear_scan_fwd")(*a, *x, *h0)
  return out[:p], out[p:]


def scan_bwd(cfg: ScanConfig, interpret: bool, a, h, dh, dht, h0):
  """Backward on parts -> (dx parts, da parts, dh0 parts); shapes as scan_fwd."""
  p = len(a)
  bsz, t, d = a[0].shape
  full = jax.ShapeDtypeStruct((bsz, t, d), jnp.float32)
  state = jax.ShapeDtypeStruct((bsz, d), jnp.float32)
  out_shape = (full,) * (2 * p) + (state,) * p
  out = pl.pallas_call(
      functools.partial(_bwd_kernel, cfg, p), out_shape=out_shape,
      grid=(bsz, d // cfg.block_d), interpret=interpret, compiler_params=_params(cfg, interpret),
      name="linear_scan_bwd")(*a, *h, *dh, *dht, *h0)
  return out[:p], out[p:2 * p], out[2 * p:]
