"""Public entry of the delta rule Pallas kernels: shape checks, padding, `jax.custom_vjp`.

Reached only through `seqmix.ops.delta_rule.delta_rule(..., impl="pallas")`.

Forward: the Pallas kernel (kernel.py). Backward, a static option (default "pallas"):
  backward="jax"     the VJP of the pure-JAX chunked form (`seqmix.ops.delta_rule._chunked`,
                     recomputed from the saved inputs inside the custom_vjp backward): correct
                     and tested, but it runs at the chunked form's speed (no Pallas backward).
  backward="pallas"  the Pallas backward kernel (kernel.backward): the forward also writes the
                     float32 state entering every chunk (the one stored intermediate), the
                     backward walks the chunks in reverse with dS on chip; see NOTES.md.
"""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels_pallas.delta_rule import kernel
from kernels_pallas.gla.ops import _pow2_at_least, default_interpret  # as rwkv6 does

_F32 = jnp.float32
BACKWARDS = ("pallas", "jax")  # the default first


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  blocks: kernel.Blocks
  interpret: bool
  backward: str
  t: int                         # the unpadded sizes, to cut the padding off again
  kd: int
  vd: int


def delta_rule(q, k, v, beta, g, h0, *, scale, chunk_size=64, block_v=64, num_warps=4,
               num_stages=2, backward=None, interpret=None):
  """The (gated) delta rule through the chunkwise kernel (kernel.py).

  Args:
    q, k: `[B, T, G, K]` (G divides H; value head j reads q/k head j // (H/G)); k L2-normalised
      by the caller (as the op's contract expects).
    v: `[B, T, H, V]`.
    beta: write strengths `[B, T, H]`.
    g: None or clamped float32 natural-log gates `[B, T, H]` (`_chunk.clamp_log_gate`).
    h0: float32 `[B, H, K, V]`.
    scale: output scale (a Python float).
    chunk_size: tokens per chunk, a power of two >= 16 (shorter sequences use a smaller one).
    block_v: value columns per program, a power of two >= 16.
    num_warps, num_stages: Triton launch parameters.
    backward: "pallas" (the backward kernel) or "jax" (the VJP of the pure-JAX chunked form,
      the fallback if the backward kernel misbehaves on a device); None: "pallas" for 16-bit
      inputs, "jax" for float32 ones. On the H200 (2026-12-03) the backward kernel's float32
      tiles asked for 245,760 bytes of shared memory (232,448 available) at K=V=128; in
      bfloat16 it passed there.
    interpret: None picks `default_interpret()`.

  Returns:
    (o `[B, T, H, V]` in the inputs' dtype, final state float32 `[B, H, K, V]`).
  """
  if q.ndim != 4 or q.shape != k.shape or v.ndim != 4 or v.shape[:2] != q.shape[:2]:
    raise ValueError(f"delta_rule pallas: q, k must be [B, T, G, K] and v [B, T, H, V]; got "
                     f"{q.shape=}, {k.shape=}, {v.shape=}.")
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  if h % hk:
    raise ValueError(f"delta_rule pallas: {q.shape=} heads must divide {v.shape=} heads.")
  if beta.shape != (b, t, h):
    raise ValueError(f"delta_rule pallas: beta must be [B, T, H] = {(b, t, h)}; got "
                     f"{beta.shape=}.")
  if g is not None and g.shape != (b, t, h):
    raise ValueError(f"delta_rule pallas: g must be None or [B, T, H] = {(b, t, h)}; got "
                     f"{g.shape=}.")
  if h0.shape != (b, h, kd, vd):
    raise ValueError(f"delta_rule pallas: {h0.shape=} must be [B, H, K, V] = {(b, h, kd, vd)}.")
  for name, val in (("chunk_size", chunk_size), ("block_v", block_v)):
    if val < 16 or val & (val - 1):
      raise ValueError(f"delta_rule pallas: {name}={val} must be a power of two >= 16 (Triton "
                       f"dots need dims >= 16); e.g. 64.")
  if backward is None:
    backward = "jax" if jnp.dtype(jnp.result_type(q.dtype, k.dtype, v.dtype)).itemsize >= 4 \
        else "pallas"
  if backward not in BACKWARDS:
    raise ValueError(f"delta_rule pallas: backward={backward!r}; choose one of {BACKWARDS}.")
  if interpret is None:
    interpret = default_interpret()
  c = min(chunk_size, _pow2_at_least(t))
  bv = min(block_v, _pow2_at_least(vd))
  cfg = _Config(float(scale), kernel.Blocks(c, bv, num_warps, num_stages), bool(interpret),
                backward, t, kd, vd)
  cdt = jnp.result_type(q.dtype, k.dtype, v.dtype)
  g = None if g is None else g.astype(_F32)
  return _core(q.astype(cdt), k.astype(cdt), v.astype(cdt), beta.astype(_F32), g,
               h0.astype(_F32), cfg)


def _pad(x, widths):
  return jnp.pad(x, widths) if any(w for _, w in widths) else x


def _padded(q, k, v, beta, g, h0, cfg):
  """Zero padding to the kernel's blocks; neutral: padded keys/values/betas write nothing,
  padded queries read nothing, padded gates (0) do not decay, padded state entries stay 0."""
  c, bv = cfg.blocks.chunk, cfg.blocks.block_v
  t, kd, vd = cfg.t, cfg.kd, cfg.vd
  tp, kp, vp = -(-t // c) * c, _pow2_at_least(kd), -(-vd // bv) * bv
  qp = _pad(q, ((0, 0), (0, tp - t), (0, 0), (0, kp - kd)))                # [b, tp, g, kp]
  kpd = _pad(k, ((0, 0), (0, tp - t), (0, 0), (0, kp - kd)))
  vpd = _pad(v, ((0, 0), (0, tp - t), (0, 0), (0, vp - vd)))                # [b, tp, h, vp]
  tok = lambda x: _pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, tp - t)))  # [b, h, tp]
  bp = tok(beta)
  gp = None if g is None else tok(g)
  h0p = _pad(h0, ((0, 0), (0, 0), (0, kp - kd), (0, vp - vd)))
  return qp, kpd, vpd, bp, gp, h0p


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(q, k, v, beta, g, h0, cfg):
  # Not differentiated: the forward alone, which stores no per-chunk states.
  o, s = kernel.forward(*_padded(q, k, v, beta, g, h0, cfg), scale=cfg.scale,
                        blocks=cfg.blocks, interpret=cfg.interpret)
  return o[:, :cfg.t, :, :cfg.vd], s[:, :, :cfg.kd, :cfg.vd]


def _fwd(q, k, v, beta, g, h0, cfg):
  padded = _padded(q, k, v, beta, g, h0, cfg)
  save = cfg.backward == "pallas"
  res = kernel.forward(*padded, scale=cfg.scale, blocks=cfg.blocks, interpret=cfg.interpret,
                       save_states=save)
  o, s = res[0], res[1]
  out = (o[:, :cfg.t, :, :cfg.vd], s[:, :, :cfg.kd, :cfg.vd])
  if save:
    return out, padded[:5] + (res[2],)
  return out, (q, k, v, beta, g, h0)


def _pallas_backward(cfg, res, cts):
  qp, kp, vp, bp, gp, states = res
  do, ds = cts
  b, tp, hk, kpd = qp.shape
  h, vpd = vp.shape[2], vp.shape[3]
  t, kd, vd = cfg.t, cfg.kd, cfg.vd
  dop = _pad(do.astype(vp.dtype), ((0, 0), (0, tp - t), (0, 0), (0, vpd - vd)))
  dsp = _pad(ds.astype(_F32), ((0, 0), (0, 0), (0, kpd - kd), (0, vpd - vd)))
  dq, dk, dv, dbeta, dg, dh0 = kernel.backward(qp, kp, vp, bp, gp, states, dop, dsp,
                                               scale=cfg.scale, blocks=cfg.blocks,
                                               interpret=cfg.interpret)
  group = lambda x: x.reshape(b, tp, hk, h // hk, kpd).sum(3)[:, :t, :, :kd]  # [b, t, g, k]
  tok = lambda x: jnp.swapaxes(x[:, :, :t], 1, 2)                            # [b, t, h]
  return (group(dq).astype(qp.dtype), group(dk).astype(kp.dtype), dv[:, :t, :, :vd],
          tok(dbeta), None if dg is None else tok(dg), dh0[:, :, :kd, :vd])


def _jax_backward(cfg, res, cts):
  """The VJP of the pure-JAX chunked form (float32 throughout; full-precision products for
  float32 inputs, where GPUs would otherwise use TF32)."""
  from seqmix.ops import delta_rule as op  # pylint: disable=import-outside-toplevel
  q, k, v, beta, g, h0 = res
  do, ds = cts
  h = v.shape[2]

  def chunked(q, k, v, beta, g, h0):
    f32 = lambda x: x.astype(_F32)
    # pylint: disable=protected-access
    qh, kh = op._expand_groups(f32(q), h), op._expand_groups(f32(k), h)
    o, s = op._chunked(qh, kh, f32(v), beta, g, cfg.scale, h0, chunk_size=cfg.blocks.chunk)
    return o.astype(v.dtype), s

  ctx = (jax.default_matmul_precision("highest") if v.dtype == _F32
         else contextlib.nullcontext())
  with ctx:
    _, vjp = jax.vjp(chunked, q, k, v, beta, g, h0)
    return vjp((do.astype(v.dtype), ds.astype(_F32)))


def _bwd(cfg, res, cts):
  if cfg.backward == "pallas":
    return _pallas_backward(cfg, res, cts)
  return _jax_backward(cfg, res, cts)


_core.defvjp(_fwd, _bwd)
