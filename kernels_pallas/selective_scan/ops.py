"""Public entry of the selective-scan kernels: shape checks, padding, custom VJP.

    selective_scan(u, delta, A, B, C, D=None, *, delta_bias=None, delta_softplus=False,
                   initial_state=None, reset=None, config=None, interpret=False) -> (y, h_T)

The semantics of `seqmix.ops.ssm.selective_scan` (which validates and dispatches here); `y`
float32 `[B, T, D]`, `h_T` float32 `[B, D, N]`. Padding (T to `block_t`, D to `block_d`, N to
a power of two) happens here; padded channels and state entries have A = B = C = 0, padded
rows are identity steps (the kernel sets Δ = 0 at t >= T).
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.selective_scan.kernel import SelectiveScanConfig, Static, ss_bwd, ss_fwd

DEFAULT = SelectiveScanConfig()
# Interpret mode (CPU checks) runs the same body with short chunks: the interpreter's time
# grows steeply with the unrolled chunk.
INTERPRET_DEFAULT = SelectiveScanConfig(block_t=4, prefetch=False)


def _pad_to(v, sizes, value=0.0):
  widths = [(0, s - n) for n, s in zip(v.shape, sizes)]
  if all(w == (0, 0) for w in widths):
    return v
  return jnp.pad(v, widths, constant_values=value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan(cfg, st, interpret, u, dl, a, bm, cm, dsk, bias, h0, keep):
  y, ht = ss_fwd(cfg, st, False, interpret, u, dl, a, bm, cm, dsk, bias, h0, keep)
  return y, ht


def _scan_fwd(cfg, st, interpret, u, dl, a, bm, cm, dsk, bias, h0, keep):
  y, ht, hs = ss_fwd(cfg, st, True, interpret, u, dl, a, bm, cm, dsk, bias, h0, keep)
  return (y, ht), (u, dl, a, bm, cm, dsk, bias, keep, hs)


def _scan_bwd(cfg, st, interpret, res, cts):
  u, dl, a, bm, cm, dsk, bias, keep, hs = res
  dy, dht = cts
  du, ddl, dbp, dcp, da, ddsk, dbias, dh0 = ss_bwd(cfg, st, interpret, u, dl, a, bm, cm, dsk,
                                                   bias, keep, hs, dy, dht)
  return (du, ddl, da.sum(0), dbp.sum(2), dcp.sum(2), ddsk.sum(0), dbias.sum(0), dh0, None)


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan(u, delta, A, B, C, D=None, *, delta_bias=None, delta_softplus=False,
                   initial_state=None, reset=None, config: SelectiveScanConfig | None = None,
                   interpret: bool = False):
  """The selective scan (module docstring) through the Pallas kernels.

  config: block sizes (None: DEFAULT, or INTERPRET_DEFAULT when interpreting).
  interpret: run the kernel bodies in the Pallas interpreter instead of compiling.
  """
  cfg = config or (INTERPRET_DEFAULT if interpret else DEFAULT)
  b, t, d = u.shape
  n = A.shape[1]
  if delta.shape != u.shape or A.shape != (d, n) or B.shape != (b, t, n) or C.shape != B.shape:
    raise ValueError(f"selective_scan kernel: need u, delta [B, T, D], A [D, N], B, C "
                     f"[B, T, N]; got {u.shape=}, {delta.shape=}, {A.shape=}, {B.shape=}, "
                     f"{C.shape=}.")
  f32 = jnp.float32
  tp = -(-t // cfg.t_multiple) * cfg.t_multiple
  dp = -(-d // cfg.block_d) * cfg.block_d
  np2 = 1 << max(0, (n - 1).bit_length())  # Triton tensors have power-of-two shapes
  st = Static(t_real=t, softplus=bool(delta_softplus), has_reset=reset is not None)
  zeros_d = jnp.zeros((d,), f32)
  dsk = zeros_d if D is None else D.astype(f32)
  bias = zeros_d if delta_bias is None else delta_bias.astype(f32)
  h0 = jnp.zeros((b, d, n), f32) if initial_state is None else initial_state.astype(f32)
  keep = jnp.ones((b, t), f32) if reset is None else 1.0 - reset.astype(f32)
  y, ht = _scan(cfg, st, interpret,
                _pad_to(u.astype(f32), (b, tp, dp)), _pad_to(delta.astype(f32), (b, tp, dp)),
                _pad_to(A.astype(f32), (dp, np2)), _pad_to(B.astype(f32), (b, tp, np2)),
                _pad_to(C.astype(f32), (b, tp, np2)), _pad_to(dsk, (dp,)), _pad_to(bias, (dp,)),
                _pad_to(h0, (b, dp, np2)), _pad_to(keep, (b, tp), 1.0))
  return y[:, :t, :d], ht[:, :d, :n]
