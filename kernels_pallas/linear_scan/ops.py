"""Public entry of the linear-scan kernels: shape checks, padding, complex split, custom VJP.

    linear_scan(a, x, h0, *, config=None, interpret=False) -> (h, h_T)

`a`, `x`: `[B, T, D]`, both float32 or both complex64; `h0`: `[B, D]` of the same dtype.
Returns `h` `[B, T, D]` and `h_T` `[B, D]` in that dtype. Reached through
`seqmix.ops.scan.linear_scan(impl="pallas")`, which flattens trailing shapes and casts.
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.linear_scan.kernel import ScanConfig, scan_bwd, scan_fwd

DEFAULT = ScanConfig()
# Interpret mode (CPU/TPU checks) runs the same body with short tiles: a 32-row unrolled tile
# makes the interpreted kernel take ~50 s at T = 63 on a CPU, 4 rows well under a second.
INTERPRET_DEFAULT = ScanConfig(block_t=4)


def _pad(v, t_to, d_to, value):
  """[B, T, D] -> [B, t_to, d_to] padded at the end with `value` (no copy when aligned)."""
  _, t, d = v.shape
  if (t, d) == (t_to, d_to):
    return v
  return jnp.pad(v, ((0, 0), (0, t_to - t), (0, d_to - d)), constant_values=value)


def _pad_state(v, d_to):
  d = v.shape[-1]
  return v if d == d_to else jnp.pad(v, ((0, 0), (0, d_to - d)))


def _padded_sizes(cfg, t, d):
  return -(-t // cfg.block_t) * cfg.block_t, -(-d // cfg.block_d) * cfg.block_d


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan_parts(cfg, interpret, a, x, h0):
  return _fwd(cfg, interpret, a, x, h0)[0]


def _fwd(cfg, interpret, a, x, h0):
  _, t, d = a[0].shape
  tp, dp = _padded_sizes(cfg, t, d)
  # Past T the neutral step (a = 1, x = 0) keeps the state, so the kernel's final state is h_T.
  a_p = tuple(_pad(v, tp, dp, 1.0 if k == 0 else 0.0) for k, v in enumerate(a))
  x_p = tuple(_pad(v, tp, dp, 0.0) for v in x)
  h0_p = tuple(_pad_state(v, dp) for v in h0)
  h_p, ht_p = scan_fwd(cfg, interpret, a_p, x_p, h0_p)
  out = (tuple(v[:, :t, :d] for v in h_p), tuple(v[:, :d] for v in ht_p))
  return out, (a_p, h_p, h0_p)


def _bwd(cfg, interpret, res, cts):
  a_p, h_p, h0_p = res
  dh, dht = cts
  _, t, d = dh[0].shape
  tp, dp = a_p[0].shape[1:]
  dh_p = tuple(_pad(v, tp, dp, 0.0) for v in dh)
  dht_p = tuple(_pad_state(v, dp) for v in dht)
  dx, da, dh0 = scan_bwd(cfg, interpret, a_p, h_p, dh_p, dht_p, h0_p)
  crop = lambda vs: tuple(v[:, :t, :d] for v in vs)
  return crop(da), crop(dx), tuple(v[:, :d] for v in dh0)


_scan_parts.defvjp(_fwd, _bwd)


def linear_scan(a, x, h0, *, config: ScanConfig | None = None, interpret: bool = False):
  """h_t = a_t h_{t-1} + x_t over axis 1 of [B, T, D] arrays (module docstring).

  config: block sizes (None: DEFAULT, or INTERPRET_DEFAULT when interpreting).
  interpret: run the kernel body in the Pallas interpreter (any backend) instead of compiling.
  """
  cfg = config or (INTERPRET_DEFAULT if interpret else DEFAULT)
  if a.ndim != 3 or a.shape != x.shape:
    raise ValueError(f"linear_scan kernel: a and x must both be [B, T, D]; got {a.shape=}, "
                     f"{x.shape=}.")
  if h0.shape != (a.shape[0], a.shape[2]):
    raise ValueError(f"linear_scan kernel: h0 must be [B, D] = {(a.shape[0], a.shape[2])}; "
                     f"got {h0.shape=}.")
  dtypes = {a.dtype, x.dtype, h0.dtype}
  if dtypes == {jnp.dtype(jnp.complex64)}:
    split = lambda v: (jnp.real(v), jnp.imag(v))
    h, ht = _scan_parts(cfg, interpret, split(a), split(x), split(h0))
    return jax.lax.complex(*h), jax.lax.complex(*ht)
  if dtypes != {jnp.dtype(jnp.float32)}:
    raise ValueError(f"linear_scan kernel: a, x, h0 must be all float32 or all complex64; got "
                     f"{a.dtype=}, {x.dtype=}, {h0.dtype=}.")
  (h,), (ht,) = _scan_parts(cfg, interpret, (a,), (x,), (h0,))
  return h, ht


