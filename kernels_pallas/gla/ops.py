"""Public entry of the gla Pallas kernels: shape checks, padding, `jax.custom_vjp`.

Reached only through `seqmix.ops.linear_attention.gla(..., impl="pallas")`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels_pallas.gla import kernel
from kernels_pallas.gla import kernel_key

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Config:
  scale: float
  blocks: kernel.Blocks
  interpret: bool
  t_valid: int = 0     # the unpadded length (a fixed gate's padded tokens are zeroed from it)


def _pow2_at_least(n, floor=16):
  p = floor
  while p < n:
    p *= 2
  return p


def default_interpret() -> bool:
  """Compiled (Triton lowering) on GPU; interpret mode everywhere else (CPU CI)."""
  return jax.default_backend() != "gpu"


def gla(q, k, v, g, h0, *, scale, chunk_size=None, block_v=64, num_warps=4, num_stages=2,
        backward="two_pass", chunk_warps=8, forward=None, super_chunk=None,
        interpret=None):
  """gla through the chunkwise kernels (kernel.py; kernel_key.py for per-key gates).

  Args:
    q, k: `[B, T, G, K]` (G divides H).
    v: `[B, T, H, V]`.
    g: None or clamped float32 natural-log gates: `[H]` (fixed per head: it stays `[H]` up
      to the kernels, kernel.py says why), `[B, T, H]` or `[B, T, H, K]` (per key).
    h0: float32 `[B, H, K, V]`.
    scale: output scale (a Python float).
    chunk_size: tokens per chunk, a power of two >= 16 (shorter sequences use a smaller one);
      None: 64, or 16 for per-key gates (their intra-chunk work grows with the chunk).
    block_v: value columns per program, a power of two >= 16.
    num_warps, num_stages: Triton launch parameters.
    backward: the scalar/fixed/no-gate backward scheme, "two_pass" or "seq" (kernel.py).
    chunk_warps: num_warps of the two-pass backward's per-chunk kernel.
    forward: the forward scheme, "two_pass" or "seq" (kernel.py, kernel_key.py); None:
      "seq" for float32 inputs and for fixed `[H]` or scalar `[B, T, H]` gates, "two_pass"
      otherwise (no gate, per-key gates). On the H200 (2026-12-03) the two-pass forward's
      float32 tiles asked for 328,704 bytes of shared memory (232,448 available) at K=V=128,
      while the sequential forward passed in float32 there. On the H200 (2026-12-04, bf16
      B=8 T=4096 H=16 K=V=128) the sequential forward took 0.713 ms (fixed gate) and 1.157 ms
      (scalar gate) against the two-pass forward's 3.485 and 3.416 ms; with no gate the
      two-pass forward took 0.628 ms, and per-key gates ran the two the same (5.82 / 5.85).
    super_chunk: tokens per super-chunk of the "two_pass" forward (a power of two; at least
      the chunk); None: 64 for per-key gates (4 chunks of 16), else 256 (4 chunks of 64).
    interpret: None picks `default_interpret()`.

  Returns:
    (o `[B, T, H, V]` in v's dtype, final state float32 `[B, H, K, V]`).
  """
  if q.ndim != 4 or q.shape != k.shape or v.ndim != 4 or v.shape[:2] != q.shape[:2]:
    raise ValueError(f"gla pallas: q, k must be [B, T, G, K] and v [B, T, H, V]; got "
                     f"{q.shape=}, {k.shape=}, {v.shape=}.")
  b, t, hk, kd = q.shape
  h, vd = v.shape[2], v.shape[3]
  if h % hk:
    raise ValueError(f"gla pallas: {q.shape=} heads must divide {v.shape=} heads.")
  per_key = g is not None and g.ndim == 4
  if g is not None and g.shape not in ((h,), (b, t, h), (b, t, h, kd)):
    raise ValueError(f"gla pallas: g must be None, [H] = {(h,)}, [B, T, H] = {(b, t, h)} or "
                     f"[B, T, H, K] = {(b, t, h, kd)}; got {g.shape=}.")
  if forward is None:
    wide = jnp.dtype(jnp.result_type(q.dtype, k.dtype, v.dtype)).itemsize >= 4
    scalar_gate = g is not None and g.ndim in (1, 3)
    forward = "seq" if wide or scalar_gate else "two_pass"
  if backward not in kernel.BACKWARDS:
    raise ValueError(f"gla pallas: backward={backward!r}; expected one of {kernel.BACKWARDS}.")
  if forward not in kernel.BACKWARDS:
    raise ValueError(f"gla pallas: forward={forward!r}; expected one of {kernel.BACKWARDS}.")
  if chunk_size is None:
    chunk_size = 16 if per_key else 64
  if super_chunk is None:
    super_chunk = 64 if per_key else 256
  if h0.shape != (b, h, kd, vd):
    raise ValueError(f"gla pallas: {h0.shape=} must be [B, H, K, V] = {(b, h, kd, vd)}.")
  for name, val in (("chunk_size", chunk_size), ("block_v", block_v),
                    ("super_chunk", super_chunk)):
    if val < 16 or val & (val - 1):
      raise ValueError(f"gla pallas: {name}={val} must be a power of two >= 16 (Triton dots "
                       f"need dims >= 16); e.g. 64.")
  if interpret is None:
    interpret = default_interpret()
  c = min(chunk_size, _pow2_at_least(t))
  kp = _pow2_at_least(kd)
  bv = min(block_v, _pow2_at_least(vd))
  vp = -(-vd // bv) * bv
  cs = super_chunk_size(c, super_chunk, t, forward == "two_pass")
  tp = -(-t // cs) * cs
  cfg = _Config(float(scale),
                kernel.Blocks(c, bv, num_warps, num_stages, backward, chunk_warps, forward, cs),
                bool(interpret), t)

  cdt = jnp.result_type(q.dtype, k.dtype, v.dtype)
  # Zero padding is neutral: padded keys/values write nothing, padded queries read nothing,
  # padded gates (0) do not decay, padded state rows/columns stay zero.
  pad = lambda x, widths: jnp.pad(x, widths) if any(w for _, w in widths) else x
  qp = pad(q.astype(cdt), ((0, 0), (0, tp - t), (0, 0), (0, kp - kd)))      # [b, tp, g, kp]
  kpd = pad(k.astype(cdt), ((0, 0), (0, tp - t), (0, 0), (0, kp - kd)))
  vpd = pad(v.astype(cdt), ((0, 0), (0, tp - t), (0, 0), (0, vp - vd)))     # [b, tp, h, vp]
  h0p = pad(h0.astype(_F32), ((0, 0), (0, 0), (0, kp - kd), (0, vp - vd)))
  if per_key:
    gp = pad(g.astype(_F32), ((0, 0), (0, tp - t), (0, 0), (0, kp - kd)))      # [b, tp, h, kp]
    o, s = _core_key(qp, kpd, vpd, gp, h0p, cfg)
    return o[:, :t, :, :vd].astype(v.dtype), s[:, :, :kd, :vd]
  gp = None
  if g is not None and g.ndim == 1:
    gp = g.astype(_F32)                                                       # [h]
  elif g is not None:
    gp = pad(jnp.swapaxes(g.astype(_F32), 1, 2), ((0, 0), (0, 0), (0, tp - t)))  # [b, h, tp]
  o, s = _core(qp, kpd, vpd, gp, h0p, cfg)
  return o[:, :t, :, :vd].astype(v.dtype), s[:, :, :kd, :vd]


def super_chunk_size(c, super_chunk, t, used):
  """Tokens per super-chunk (T is padded to it): c when unused, else super_chunk clipped to
  the padded sequence, never below c."""
  return max(c, min(super_chunk, _pow2_at_least(t))) if used else c


def _kernel_gate(g, cfg):
  """None | [H] -> [H, C] (one chunk of a fixed gate) | [B, H, T] as is."""
  if g is not None and g.ndim == 1:
    return jnp.broadcast_to(g[:, None], (g.shape[0], cfg.blocks.chunk))      # [h, c]
  return g


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(q, k, v, g, h0, cfg):
  return kernel.forward(q, k, v, _kernel_gate(g, cfg), h0, scale=cfg.scale, blocks=cfg.blocks,
                        interpret=cfg.interpret, t_valid=cfg.t_valid)


def _fwd(q, k, v, g, h0, cfg):
  if cfg.blocks.backward == "two_pass":
    # The states entering each chunk go to the backward, in the inputs' dtype (they only feed
    # products in that dtype there; float32 for float32 inputs).
    o, s, states = kernel.forward(q, k, v, _kernel_gate(g, cfg), h0, scale=cfg.scale,
                                  blocks=cfg.blocks, interpret=cfg.interpret,
                                  t_valid=cfg.t_valid, states_dtype=v.dtype)
  else:
    o, s = _core(q, k, v, g, h0, cfg)
    states = None
  return (o, s), (q, k, v, g, h0, states)


def _bwd(cfg, res, cts):
  q, k, v, g, h0, states = res
  do, ds = cts
  b, t, hk, kd = q.shape
  h = v.shape[2]
  # dq, dk straight in the inputs' dtype unless heads share q/k (summed below in float32).
  dqk_dtype = q.dtype if hk == h else _F32
  dq, dk, dv, dh0, dg = kernel.backward(q, k, v, _kernel_gate(g, cfg), h0, do.astype(v.dtype),
                                        ds.astype(_F32), scale=cfg.scale, blocks=cfg.blocks,
                                        interpret=cfg.interpret, t_valid=cfg.t_valid,
                                        states=states, dqk_dtype=dqk_dtype)
  if g is not None and g.ndim == 1:
    dg = dg[:, :, :cfg.t_valid].sum((0, 2))                                   # [h]
  if hk != h:
    group = lambda x: x.reshape(b, t, hk, h // hk, kd).astype(_F32).sum(3)  # [b, t, g, k]
    dq, dk = group(dq), group(dk)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv, dg, dh0


_core.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core_key(q, k, v, g, h0, cfg):
  return kernel_key.forward(q, k, v, g, h0, scale=cfg.scale, blocks=cfg.blocks,
                            interpret=cfg.interpret)


def _fwd_key(q, k, v, g, h0, cfg):
  # The states entering each chunk go to the backward: float32 for float32 inputs, else the
  # inputs' dtype (they only feed bf16 products there).
  o, s, states = kernel_key.forward(q, k, v, g, h0, scale=cfg.scale, blocks=cfg.blocks,
                                    interpret=cfg.interpret, states_dtype=v.dtype)
  return (o, s), (q, k, v, g, states)


def _bwd_key(cfg, res, cts):
  q, k, v, g, states = res
  do, ds = cts
  dq, dk, dv, dh0, dg = kernel_key.backward(q, k, v, g, states, do.astype(v.dtype),
                                            ds.astype(_F32), scale=cfg.scale,
                                            blocks=cfg.blocks, interpret=cfg.interpret)
  b, t, hk, kd = q.shape
  h = v.shape[2]
  group = lambda x: x.reshape(b, t, hk, h // hk, kd).sum(3)                 # [b, t, g, k]
  return group(dq).astype(q.dtype), group(dk).astype(k.dtype), dv, dg, dh0


_core_key.defvjp(_fwd_key, _bwd_key)
