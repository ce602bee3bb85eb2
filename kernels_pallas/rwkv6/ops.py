"""Public entry of the rwkv6 Pallas kernels: shape checks, padding, `jax.custom_vjp`.

Reached only through `seqmix.ops.linear_attention.rwkv6(..., impl="pallas")`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels_pallas.gla import kernel as gla_kernel
from kernels_pallas.gla.ops import _pow2_at_least, default_interpret, super_chunk_size
from kernels_pallas.rwkv6 import kernel

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  blocks: gla_kernel.Blocks
  interpret: bool


def rwkv6(r, k, v, w, u, h0, *, scale, chunk_size=16, block_v=64, num_warps=4, num_stages=2,
          forward="two_pass", super_chunk=64, interpret=None):
  """rwkv6 through the chunkwise kernels.

  Args:
    r, k: `[B, T, H, K]`; v: `[B, T, H, V]`.
    w: clamped float32 natural-log decays `[B, T, H, K]`.
    u: float32 bonus `[H, K]`.
    h0: float32 `[B, H, K, V]`.
    scale: output scale (a Python float).
    chunk_size: tokens per chunk, a power of two >= 16.
    block_v: value columns per program, a power of two >= 16.
    num_warps, num_stages: Triton launch parameters.
    forward: "two_pass" (states per super-chunk, then super-chunks in parallel) or "seq" (one
      serial program per head and V block); kernels_pallas/gla/kernel_key.py.
    super_chunk: tokens per super-chunk of the "two_pass" forward (a power of two).
    interpret: None picks `default_interpret()` (compiled on GPU only).

  Returns:
    (o `[B, T, H, V]` in v's dtype, final state float32 `[B, H, K, V]`).
  """
  if r.ndim != 4 or k.shape != r.shape or w.shape != r.shape or v.shape[:3] != r.shape[:3]:
    raise ValueError(f"rwkv6 pallas: r, k, w must be [B, T, H, K] and v [B, T, H, V]; got "
                     f"{r.shape=}, {k.shape=}, {w.shape=}, {v.shape=}.")
  b, t, h, kd = r.shape
  vd = v.shape[3]
  if u.shape != (h, kd) or h0.shape != (b, h, kd, vd):
    raise ValueError(f"rwkv6 pallas: u must be [H, K] = {(h, kd)} and h0 [B, H, K, V] = "
                     f"{(b, h, kd, vd)}; got {u.shape=}, {h0.shape=}.")
  if forward not in gla_kernel.BACKWARDS:
    raise ValueError(f"rwkv6 pallas: forward={forward!r}; expected one of "
                     f"{gla_kernel.BACKWARDS}.")
  for name, val in (("chunk_size", chunk_size), ("block_v", block_v),
                    ("super_chunk", super_chunk)):
    if val < 16 or val & (val - 1):
      raise ValueError(f"rwkv6 pallas: {name}={val} must be a power of two >= 16 (Triton dots "
                       f"need dims >= 16); e.g. 16.")
  if interpret is None:
    interpret = default_interpret()
  c = min(chunk_size, _pow2_at_least(t))
  kp = _pow2_at_least(kd)
  bv = min(block_v, _pow2_at_least(vd))
  vp = -(-vd // bv) * bv
  cs = super_chunk_size(c, super_chunk, t, forward == "two_pass")
  tp = -(-t // cs) * cs
  cfg = _Config(float(scale), gla_kernel.Blocks(c, bv, num_warps, num_stages, forward=forward,
                                                super_chunk=cs), bool(interpret))
  cdt = jnp.result_type(r.dtype, k.dtype, v.dtype)
  # Zero padding is neutral (no reads, no writes, no decay, zero state rows/columns).
  pad = lambda x, widths: jnp.pad(x, widths) if any(wd for _, wd in widths) else x
  tk = ((0, 0), (0, tp - t), (0, 0), (0, kp - kd))
  o, s = _core(pad(r.astype(cdt), tk), pad(k.astype(cdt), tk),
               pad(v.astype(cdt), ((0, 0), (0, tp - t), (0, 0), (0, vp - vd))),
               pad(w.astype(_F32), tk), pad(u.astype(_F32), ((0, 0), (0, kp - kd))),
               pad(h0.astype(_F32), ((0, 0), (0, 0), (0, kp - kd), (0, vp - vd))), cfg)
  return o[:, :t, :, :vd].astype(v.dtype), s[:, :, :kd, :vd]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(r, k, v, w, u, h0, cfg):
  return kernel.forward(r, k, v, w, u, h0, scale=cfg.scale, blocks=cfg.blocks,
                        interpret=cfg.interpret)


def _fwd(r, k, v, w, u, h0, cfg):
  # The states entering each chunk go to the backward (float32 for float32 inputs, else the
  # inputs' dtype: they only feed bf16 products there).
  o, s, states = kernel.forward(r, k, v, w, u, h0, scale=cfg.scale, blocks=cfg.blocks,
                                interpret=cfg.interpret, states_dtype=v.dtype)
  return (o, s), (r, k, v, w, u, states)


def _bwd(cfg, res, cts):
  r, k, v, w, u, states = res
  do, ds = cts
  dr, dk, dw, dv, dh0, du = kernel.backward(r, k, v, w, u, states, do.astype(v.dtype),
                                            ds.astype(_F32), scale=cfg.scale,
                                            blocks=cfg.blocks, interpret=cfg.interpret)
  return dr.astype(r.dtype), dk.astype(k.dtype), dv, dw, du, dh0


_core.defvjp(_fwd, _bwd)
