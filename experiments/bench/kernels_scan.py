"""Device check and benchmark of the scan kernels: linear_scan and selective_scan, impl="pallas".

  PYTHONPATH=. python3 -m experiments.bench.kernels_scan [--full]

Default: the checks (selective_scan also through the v2 backward configs), linear_scan at
T = 4096, 16384, 65536 (pallas, associative; the block-size variants at 4096), selective_scan
at T = 4096 (chunked, pallas v1 and v2 and the tile variants) and 16384 (chunked and two
pallas configs); --full adds selective_scan T = 65536, linear_scan chunked and the
complex / no-reset checks.

(1) Checks pallas against `reference` on the GPU at a medium shape (relative errors of the
outputs, final state and every gradient; PASS/FAIL per op). (2) Times the jitted forward and
forward+backward (grads of all inputs of `sum(out)`; medians of 20 after 3 warm-ups) of pallas
and the existing fast impls at B=8, D=2048 (N=16), float32, at the T listed above (~3 min;
--full ~4 min), with XLA's compiled peak-memory estimate, the memory-bound floor (bytes that
must move at 2.8e12 B/s, the measured H200 copy rate) and the achieved rate (floor bytes /
time). Each row catches and prints its own failure; a shape whose estimate does not fit the
device is skipped with a note.

Floors (float32 words):
  linear_scan fwd       reads a, x; writes h                              3 BTD
  linear_scan fwd+bwd   fwd + reads a, h, dh; writes da, dx              8 BTD
  selective_scan fwd    reads u, Δ, B, C; writes y                       3 BTD + 2 BTN
  selective_scan f+b    fwd + reads u, Δ, B, C, dy; writes du, dΔ, dB, dC  8 BTD + 6 BTN
"""

import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import _timing
from kernels_pallas.linear_scan import ops as ls_kernel
from kernels_pallas.linear_scan.kernel import ScanConfig
from kernels_pallas.selective_scan import ops as ss_kernel
from kernels_pallas.selective_scan.kernel import SelectiveScanConfig
from seqmix.ops import scan
from seqmix.ops import ssm
from seqmix.testing import rel_err

BW = 2.8e12  # B/s, measured H200 copy (issue 9)
B, D, N = 8, 2048, 16
TS = (4096, 16384, 65536)
REPS = 20
CHECK_TOL = 1e-5  # float32 against the float32 reference
T0 = 0.0  # start of main(), for the progress stamps
LS_CHECK = (4, 1000, 300)  # [B, T, D] of the linear_scan check
SS_CHECK = (2, 1000, 256, 16)  # B, T, D, N of the selective_scan check


def _compile(fn, args):
  """(executable, peak bytes: XLA's arguments + outputs + temporaries, aliasing removed)."""
  compiled = jax.jit(fn).lower(*args).compile()
  m = compiled.memory_analysis()
  return compiled, (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                    - m.alias_size_in_bytes)


def _device_bytes():
  try:
    return jax.devices()[0].memory_stats()["bytes_limit"]
  except Exception:  # pylint: disable=broad-except
    return None


def _print_header():
  print(f"{'op':<15}{'impl':<28}{'T':>7} {'fwd ms':>8} {'f+b ms':>8} {'f+b GiB':>8} "
        f"{'floor f':>8} {'floor fb':>8} {'fwd GB/s':>9} {'fb GB/s':>8}", flush=True)


def _row(op, impl, t, fwd, fb, args, floor_f_bytes, floor_fb_bytes, limit):
  """Time one impl; print one line (its failure, or a skip when it does not fit); never raise."""
  ff, ffb = floor_f_bytes / BW * 1e3, floor_fb_bytes / BW * 1e3
  head = f"{op:<15}{impl:<28}{t:>7}"
  try:
    fb_exe, peak = _compile(fb, args)
    if limit is not None and peak > 0.9 * limit:
      print(f"{head} skipped: fwd+bwd needs {peak / 2**30:.1f} GiB of {limit / 2**30:.0f}",
            flush=True)
      return None
    ms_fb = _timing.median_ms(fb_exe, *args, warmup=3, reps=REPS)
    del fb_exe
    ms_f = _timing.median_ms(_compile(fwd, args)[0], *args, warmup=3, reps=REPS)
    print(f"{head} {ms_f:8.3f} {ms_fb:8.3f} {peak / 2**30:8.2f} {ff:8.3f} {ffb:8.3f} "
          f"{floor_f_bytes / ms_f / 1e6:9.0f} {floor_fb_bytes / ms_fb / 1e6:8.0f}", flush=True)
    return ms_f, ms_fb
  except Exception as e:  # pylint: disable=broad-except
    lines = str(e).strip().splitlines()
    print(f"{head} FAILED {type(e).__name__}: {lines[0][:150] if lines else ''}", flush=True)
    return None


def _grads(fn, argnums):
  return jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=argnums)


def _report(name, got, want, tol=CHECK_TOL):
  errs = [rel_err(g, w) for g, w in zip(got, want)]
  finite = all(bool(np.all(np.isfinite(np.asarray(g)))) for g in got)
  ok = finite and all(e <= tol for e in errs)
  print(f"  {name}: {'PASS' if ok else 'FAIL'} (tol {tol:.0e}) "
        + " ".join(f"{e:.2e}" for e in errs) + ("" if finite else " NON-FINITE"), flush=True)
  return ok


def _vjp_all(fn, args, seed):
  out, vjp = jax.vjp(fn, *args)
  rng = np.random.default_rng(seed)
  cts = jax.tree.map(lambda v: jnp.asarray(
      rng.normal(size=v.shape) + (1j * rng.normal(size=v.shape) if jnp.iscomplexobj(v) else 0),
      v.dtype), out)
  return list(jax.tree.leaves(out)) + list(jax.tree.leaves(vjp(cts)))


def check_linear_scan(kinds=("real",)):
  """Pallas vs reference on the GPU, LS_CHECK shape, real (and complex), with h0."""
  print(f"linear_scan check {list(LS_CHECK)} (h, h_T, da, dx, dh0):", flush=True)
  ok = True
  rng = np.random.default_rng(0)
  shape = LS_CHECK
  for kind in kinds:
    try:
      if kind == "real":
        a = rng.uniform(-1, 1, shape)
        a[rng.random(shape) < 0.05] = 0.0
        x, h0 = rng.normal(size=shape), rng.normal(size=(shape[0], shape[2]))
        dt = jnp.float32
      else:
        a = rng.uniform(0.5, 0.999, shape) * np.exp(1j * rng.uniform(-3, 3, shape))
        x = rng.normal(size=shape) + 1j * rng.normal(size=shape)
        h0 = rng.normal(size=(shape[0], shape[2])) + 1j * rng.normal(size=(shape[0], shape[2]))
        dt = jnp.complex64
      args = tuple(jnp.asarray(v, dt) for v in (a, x, h0))
      res = {impl: _vjp_all(jax.jit(lambda a, x, h0, impl=impl: scan.linear_scan(
          a, x, initial_state=h0, impl=impl)), args, 1) for impl in ("pallas", "reference")}
      print(f"    ({time.time() - T0:.0f} s)", flush=True)
      ok &= _report(kind, res["pallas"], res["reference"])
    except Exception:  # pylint: disable=broad-except
      print(f"  {kind}: FAIL (exception)\n{traceback.format_exc()}", flush=True)
      ok = False
  return ok


# ptxas (sm_90a) on the default forward: 144 registers, no spills, 1 warp per program: the
# kernel is not register-bound; at B·D/32 = 512 one-warp programs an SM holds ~4 warps, so
# the variants change the loads in flight per warp (block_t, prefetch) or the warps per SM
# (block_d = 16: 1024 programs with half-used warps; block_d = 128: 128 four-warp programs,
# 512 B contiguous per row but 4 SMs idle).
LS_VARIANTS = {
    "pallas d32 t32 noprefetch": ScanConfig(block_d=32, block_t=32, prefetch=False),
    "pallas d32 t16": ScanConfig(block_d=32, block_t=16),
    "pallas d32 t64": ScanConfig(block_d=32, block_t=64),
    "pallas d32 t128 noprefetch": ScanConfig(block_d=32, block_t=128, prefetch=False),
    "pallas d16 t32": ScanConfig(block_d=16, block_t=32, num_warps=1),
    "pallas d16 t64": ScanConfig(block_d=16, block_t=64, num_warps=1),
    "pallas d64 t32": ScanConfig(block_d=64, block_t=32),
    "pallas d64 t64": ScanConfig(block_d=64, block_t=64),
    "pallas d128 t16": ScanConfig(block_d=128, block_t=16),
    "pallas d128 t32": ScanConfig(block_d=128, block_t=32),
}


def bench_linear_scan(limit, full):
  """pallas and associative at every T of TS (chunked with full); the variants at TS[0]."""
  key = jax.random.PRNGKey(0)
  for t in TS:
    k1, k2 = jax.random.split(key)
    try:
      a = jax.random.uniform(k1, (B, t, D), jnp.float32, -1.0, 1.0)
      x = jax.random.normal(k2, (B, t, D), jnp.float32)
    except Exception as e:  # pylint: disable=broad-except
      print(f"linear_scan T={t}: inputs do not fit ({type(e).__name__}); skipped", flush=True)
      continue
    btd = B * t * D
    rows = [(impl, lambda a, x, impl=impl: scan.linear_scan(a, x, impl=impl)[0])
            for impl in (("associative", "chunked") if full else ("associative",))]
    variants = {"pallas": None, **(LS_VARIANTS if t == TS[0] else {})}
    for name, cfg in variants.items():
      rows.append((name, lambda a, x, cfg=cfg: ls_kernel.linear_scan(
          a, x, jnp.zeros((a.shape[0], a.shape[2]), a.dtype), config=cfg)[0]))
    for name, f in rows:
      _row("linear_scan", name, t, f, _grads(f, (0, 1)), (a, x), 3 * 4 * btd, 8 * 4 * btd, limit)
    del a, x


def _ss_inputs(key, b, t, d, n):
  ks = jax.random.split(key, 8)
  u = jax.random.normal(ks[0], (b, t, d), jnp.float32)
  delta = jax.random.normal(ks[1], (b, t, d), jnp.float32) * 0.5 - 2.0
  a = -jnp.exp(jax.random.normal(ks[2], (d, n), jnp.float32) * 0.5)
  bm = jax.random.normal(ks[3], (b, t, n), jnp.float32)
  cm = jax.random.normal(ks[4], (b, t, n), jnp.float32)
  dsk = jax.random.normal(ks[5], (d,), jnp.float32)
  bias = jax.random.normal(ks[6], (d,), jnp.float32) * 0.5
  return u, delta, a, bm, cm, dsk, bias


def check_selective_scan(resets=(True,)):
  """Pallas vs reference, B=2 T=1000 D=256 N=16, softplus, bias, D skip, h0, resets."""
  print(f"selective_scan check {list(SS_CHECK)} (y, h_T, du, ddelta, dA, dB, dC, dD, dbias, "
        "dh0):", flush=True)
  ok = True
  for with_reset in resets:
    try:
      b, t, d, n = SS_CHECK
      args = _ss_inputs(jax.random.PRNGKey(1), b, t, d, n)
      h0 = jax.random.normal(jax.random.PRNGKey(2), (b, d, n), jnp.float32)
      reset = (jax.random.uniform(jax.random.PRNGKey(3), (b, t)) < 0.02) if with_reset else None
      res = {}
      for impl in ("pallas", "reference"):
        def f(u, dl, a, bm, cm, dsk, bias, h0, impl=impl):
          return ssm.selective_scan(u, dl, a, bm, cm, dsk, delta_bias=bias, delta_softplus=True,
                                    initial_state=h0, reset=reset, impl=impl)
        # The reference's einsum at full float32 (GPU default would be TF32, ~1e-3 off).
        with jax.default_matmul_precision("highest"):
          res[impl] = _vjp_all(jax.jit(f), args + (h0,), 4)
      print(f"    ({time.time() - T0:.0f} s)", flush=True)
      ok &= _report(f"reset={with_reset}", res["pallas"], res["reference"])
      for name in SS_CHECK_VARIANTS:
        def g(u, dl, a, bm, cm, dsk, bias, h0, cfg=SS_VARIANTS[name]):
          return ss_kernel.selective_scan(u, dl, a, bm, cm, dsk, delta_bias=bias,
                                          delta_softplus=True, initial_state=h0, reset=reset,
                                          config=cfg)
        try:
          ok &= _report(f"{name} reset={with_reset}", _vjp_all(jax.jit(g), args + (h0,), 4),
                        res["reference"])
        except Exception:  # pylint: disable=broad-except
          print(f"  {name}: FAIL (exception)\n{traceback.format_exc()}", flush=True)
          ok = False
    except Exception:  # pylint: disable=broad-except
      print(f"  reset={with_reset}: FAIL (exception)\n{traceback.format_exc()}", flush=True)
      ok = False
  return ok


# Registers per thread (ptxas -v, sm_90a, Triton 3.9 on the TTIR of this jax; NOTES.md):
# fwd t16 prefetch 255 + spills, t8 188, t4 109; bwd v1 t16 255 + spills, t8 255, t4 153;
# bwd v2 b2 96, b4 145, b8 255; block_d 8 with 1 warp (no cross-warp reductions): fwd 118,
# bwd 161.
# At 4 warps, <= 128 registers lets 4 programs share an SM, i.e. the 512 programs of the
# benchmark shape run in one wave on 132 SMs.
SS_VARIANTS = {
    "pallas": None,
    "pallas v1 t4": SelectiveScanConfig(block_t=4),
    "pallas v1 t8": SelectiveScanConfig(block_t=8),
    "pallas v2 t4 b4": SelectiveScanConfig(block_t=4, backward="v2", bwd_block_t=4),
    "pallas v2 t16 b4": SelectiveScanConfig(block_t=16, backward="v2", bwd_block_t=4),
    "pallas v2 t8 b4": SelectiveScanConfig(block_t=8, backward="v2", bwd_block_t=4),
    "pallas v2 t4 b8": SelectiveScanConfig(block_t=4, backward="v2", bwd_block_t=8),
    # 96 registers (5 programs per SM), at the price of a saved state every 2 tokens.
    "pallas v2 t4 b2": SelectiveScanConfig(block_t=4, backward="v2", bwd_block_t=2),
    "pallas v2 d8 w1 t4 b4": SelectiveScanConfig(block_d=8, num_warps=1, block_t=4,
                                                 backward="v2", bwd_block_t=4),
}
# Checked against the reference before timing (one per code path: v2 with checkpoints every
# forward chunk, every other chunk, and several per chunk).
SS_CHECK_VARIANTS = ("pallas v2 t4 b4", "pallas v2 t4 b8", "pallas v2 t8 b4")
# The rows timed at the long T (the variants only at T = 4096).
SS_LONG = ("pallas", "pallas v2 t4 b4", "pallas v2 t4 b2")


def bench_selective_scan(limit, full):
  for t in TS:
    if t != TS[0] and not full and t > TS[1]:
      continue
    try:
      u, delta, a, bm, cm, dsk, bias = _ss_inputs(jax.random.PRNGKey(0), B, t, D, N)
    except Exception as e:  # pylint: disable=broad-except
      print(f"selective_scan T={t}: inputs do not fit ({type(e).__name__}); skipped", flush=True)
      continue
    rows = [("chunked", lambda *v: ssm.selective_scan(
        *v[:5], dsk, delta_bias=bias, delta_softplus=True, impl="chunked")[0])]
    for name, cfg in SS_VARIANTS.items():
      if t != TS[0] and name not in SS_LONG:
        continue
      rows.append((name, lambda *v, cfg=cfg: ss_kernel.selective_scan(
          *v[:5], dsk, delta_bias=bias, delta_softplus=True, config=cfg)[0]))
    btd, btn = B * t * D, B * t * N
    for name, f in rows:
      _row("selective_scan", name, t, f, _grads(f, (0, 1, 2, 3, 4)), (u, delta, a, bm, cm),
           4 * (3 * btd + 2 * btn), 4 * (8 * btd + 6 * btn), limit)
    del u, delta, bm, cm


def main(full: bool = False):
  """Default: the checks and the rows of the module docstring (~3 min). full: + complex check,
  no-reset check, selective_scan T = 65536, linear_scan chunked."""
  global T0
  T0 = time.time()
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}); jax {jax.__version__}; "
        f"B={B} D={D} N={N} float32; floor at {BW / 1e12:.1f} TB/s; full={full}", flush=True)
  limit = _device_bytes()
  ok = check_linear_scan(("real", "complex") if full else ("real",))
  print(f"CHECK linear_scan: {'PASS' if ok else 'FAIL'}", flush=True)
  _print_header()
  bench_linear_scan(limit, full)
  ok = check_selective_scan((False, True) if full else (True,))
  print(f"CHECK selective_scan: {'PASS' if ok else 'FAIL'}", flush=True)
  _print_header()
  bench_selective_scan(limit, full)
  print(f"total {time.time() - T0:.0f} s", flush=True)


if __name__ == "__main__":
  main(full="--full" in sys.argv[1:])
