"""Pallas linear-attention kernels on the device: correctness vs the reference, then timing.

  PYTHONPATH=. python3 -m experiments.bench.kernels_linear_attention [--full]

The default run fits ~3 min: a lean correctness check (12 cases at B=1 T=500), then pallas for
every row beside its first (serial, "seq") forward and backward (fixed, scalar gates) or forward
(per-key, rwkv6), and chunked for the fixed and scalar gates, at B=8 T=4096 (rows past 150 s are
skipped and say so). --full: every case at B=2 T=1000, chunked for every row, static-block
variants, B=2 T=16384 and the fla hook.

(1) Correctness on this backend at a medium shape (B=2, T=1000, H=4 value heads over 2 q/k
heads, K=V=128 and K=V=60, float32 and bfloat16, weak and strong gates with -inf resets):
relative errors of the output, the final state and the gradients of every input against the
float32 reference scan, PASS/FAIL against the test tolerances (float32 1e-5, bfloat16 1e-2; a
fixed [H] gate's gradient is a sum of B·T terms and is printed for information).
(2) Timing at B=8 T=4096 H=16 K=V=128 bf16 (and B=2 T=16384) of each issue-8 row built so far:
pallas (default blocks, and at T=4096 static-block variants "pallas:Vb:warps:stages:chunk") vs
chunked, forward and forward+backward (jit, medians of 20 after warm-up), XLA's peak
memory estimate of forward+backward, the memory-bound floor and the achieved TFLOP/s.
(3) `time_fla`: the hook that times the matching fla kernel when `import fla` works (the lead
times fla separately); otherwise it prints "fla not installed".
Every row catches and prints its own exception.
"""

import functools
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from experiments.bench import _timing
from seqmix.ops import linear_attention
from seqmix.testing import rel_err

# Measured copy bandwidth of the H200 (issue 8); the floor is bytes that must move / this.
_COPY_BYTES_PER_S = 2.8e12
_RTOL = {"float32": 1e-5, "bfloat16": 1e-2}
_REPS = 20


def _gate(key, kind, strength, b, t, h, kd):
  shape = {"none": None, "fixed": (h,), "scalar": (b, t, h), "key": (b, t, h, kd)}[kind]
  if shape is None:
    return None
  x = jax.random.normal(key, shape)
  if strength == "weak":
    return jax.nn.log_sigmoid(x) / 16.0
  g = jax.nn.log_sigmoid(x) / 0.05
  return jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), shape) < 0.05, -jnp.inf, g)


def _gla_args(kind, strength, b, t, h, hk, kd, vd, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q = (jax.random.normal(ks[0], (b, t, hk, kd)) / kd ** 0.25).astype(dtype)
  k = (jax.random.normal(ks[1], (b, t, hk, kd)) / kd ** 0.25).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, vd)).astype(dtype)
  g = _gate(ks[3], kind, strength, b, t, h, kd)
  h0 = jax.random.normal(ks[4], (b, h, kd, vd))
  cts = (jax.random.normal(ks[5], (b, t, h, vd)).astype(dtype),
         jax.random.normal(ks[6], (b, h, kd, vd)))
  return (q, k, v, g, h0), cts


def _gla(impl):
  if impl.startswith("pallas:"):
    return _gla_variant(*impl.split(":")[1:])
  return lambda q, k, v, g, h0: linear_attention.gla(q, k, v, g, initial_state=h0, impl=impl)


def _gla_variant(block_v, num_warps, num_stages, chunk, backward="two_pass", chunk_warps="8",
                 forward="two_pass", super_chunk="0"):
  """The pallas kernels with other static options ("pallas:Vb:warps:stages:chunk[:backward
  [:chunk_warps[:forward[:super_chunk]]]]" rows; backward "seq" is the first, serial backward
  of the scalar, fixed and absent gates, forward "seq" the first, serial per-key forward;
  "two_pass" the defaults)."""
  from kernels_pallas.gla import ops  # pylint: disable=import-outside-toplevel
  from seqmix.ops import _chunk  # pylint: disable=import-outside-toplevel

  def fn(q, k, v, g, h0):
    if g is not None:
      g = _chunk.clamp_log_gate(g.astype(jnp.float32))
      if g.ndim > 1:
        g = jnp.broadcast_to(g, (q.shape[0], q.shape[1], v.shape[2]) + g.shape[3:])
    return ops.gla(q, k, v, g, h0, scale=q.shape[-1] ** -0.5, block_v=int(block_v),
                   num_warps=int(num_warps), num_stages=int(num_stages), chunk_size=int(chunk),
                   backward=backward, chunk_warps=int(chunk_warps), forward=forward,
                   super_chunk=int(super_chunk) or None)
  return fn


def _rwkv6_variant(block_v, num_warps, num_stages, chunk, _backward="two_pass", _chunk_warps="8",
                   forward="two_pass", super_chunk="64"):
  """rwkv6 through the kernels with the same "pallas:..." fields as `_gla_variant` (its
  backward has one scheme: the backward fields are ignored)."""
  from kernels_pallas.rwkv6 import ops  # pylint: disable=import-outside-toplevel
  from seqmix.ops import _chunk  # pylint: disable=import-outside-toplevel

  def fn(r, k, v, w, u, h0):
    return ops.rwkv6(r, k, v, _chunk.clamp_log_gate(w.astype(jnp.float32)),
                     u.astype(jnp.float32), h0, scale=1.0, block_v=int(block_v),
                     num_warps=int(num_warps), num_stages=int(num_stages),
                     chunk_size=int(chunk), forward=forward, super_chunk=int(super_chunk))
  return fn


# The first (serial) forward and backward, timed beside the default two-pass ones in every
# run (super-chunk 0: the default, 256 tokens for scalar gates, 64 per-key).
_SEQ = "pallas:64:4:2:64:seq:8:seq"
# Static-block variants timed beside the default (block_v=64, num_warps=4, num_stages=2,
# two-pass backward with an 8-warp per-chunk kernel) at T=4096 (--full), scalar gate only
# (the fixed and absent gates run the same kernels).
_VARIANTS = ("pallas:128:8:2:64", "pallas:32:4:2:64", "pallas:64:4:3:64",
             "pallas:64:4:2:64:two_pass:4", "pallas:64:4:2:128", "pallas:64:4:2:32",
             "pallas:64:4:2:64:two_pass:8:two_pass:128",
             "pallas:64:4:2:64:two_pass:8:two_pass:512",
             "pallas:64:4:2:64:two_pass:8:seq", "pallas:64:4:2:64:seq:8:two_pass")
# Per-key gate and rwkv6: the first (serial) forward, timed beside the default two-pass one
# in every run; --full adds V blocks, chunk and super-chunk sizes (default 64:4:2:16, super 64).
_KEY_SEQ = "pallas:64:4:2:16:two_pass:8:seq"
_KEY_VARIANTS = ("pallas:128:8:2:16", "pallas:64:4:2:32", "pallas:32:4:2:16",
                 "pallas:64:4:2:16:two_pass:8:two_pass:128",
                 "pallas:64:4:2:16:two_pass:8:two_pass:32", "pallas:128:8:2:16:two_pass:8:seq")


def _vjp_all(fn, args, cts):
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(cts)


_value_and_grads = jax.jit(_vjp_all, static_argnums=0)


# (op, gate kind, strength, K = V, dtype): the default run's correctness cases; --full adds
# every combination of {none, fixed, scalar, key, rwkv6} x {weak, strong} x {128, 60} x dtypes.
_CASES = [("gla", "none", "weak", 128, jnp.bfloat16), ("gla", "fixed", "strong", 128, jnp.float32),
          ("gla", "scalar", "strong", 128, jnp.float32),
          ("gla", "scalar", "weak", 60, jnp.bfloat16),
          ("gla", "key", "strong", 128, jnp.float32), ("gla", "key", "weak", 60, jnp.bfloat16),
          ("rwkv6", "key", "strong", 60, jnp.float32), ("rwkv6", "key", "weak", 128, jnp.bfloat16),
          ("gla", "scalar", "strong", 128, jnp.float32, _SEQ),
          ("gla", "fixed", "weak", 128, jnp.bfloat16, _SEQ),
          ("gla", "key", "strong", 128, jnp.float32, _KEY_SEQ),
          ("rwkv6", "key", "strong", 60, jnp.float32, _KEY_SEQ)]


def _all_cases():
  out = []
  for kd in (128, 60):
    for dtype in (jnp.float32, jnp.bfloat16):
      for strength in ("weak", "strong"):
        out += [("gla", kind, strength, kd, dtype) for kind in ("none", "fixed", "scalar", "key")
                if not (kind == "none" and strength == "strong")]
        out.append(("rwkv6", "key", strength, kd, dtype))
  return out


def check_correctness(b=2, t=1000, cases=None):
  """Prints one line per case; returns the number of failures."""
  print(f"== correctness: pallas vs reference at B={b} T={t} H=4 (2 q/k heads for gla); rel. "
        "errors of o, state, then the grads (gla: q, k, v, g, h0; rwkv6: r, k, v, w, u, h0)")
  fails = 0
  for case in cases or _CASES:
    op, kind, strength, kd, dtype = case[:5]
    impl = case[5] if len(case) > 5 else "pallas"
    name = f"{op:<5} {kind:<6} {strength:<6} K=V={kd:<3} {jnp.dtype(dtype).name:<8}"
    name += "" if impl == "pallas" else f" {impl}"
    try:
      if op == "gla":
        args, cts = _gla_args(kind, strength, b, t, 4, 2, kd, kd, dtype)
        fn = _gla
      else:
        args, cts = _rwkv6_args(strength, b, t, 4, kd, kd, dtype)
        fn = _rwkv6
      f32 = lambda x: None if x is None else x.astype(jnp.float32)
      with jax.default_matmul_precision("highest"):
        ref = _value_and_grads(fn("reference"), tuple(map(f32, args)), tuple(map(f32, cts)))
      got = _value_and_grads(fn(impl), args, cts)
      errs = [rel_err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
      finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))
      # A fixed [H] gate's gradient sums B·T terms that cancel: printed, not judged.
      checked = [e for i, e in enumerate(errs) if not (kind == "fixed" and i == 5)]
      ok = finite and max(checked) <= _RTOL[jnp.dtype(dtype).name]
      fails += not ok
      print(f"{name} {'PASS' if ok else 'FAIL'} " + " ".join(f"{e:.1e}" for e in errs)
            + ("" if finite else " NON-FINITE"), flush=True)
    except Exception as e:  # pylint: disable=broad-except
      fails += 1
      print(f"{name} FAIL {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
      traceback.print_exc(limit=3)
  print(f"== correctness: {'PASS' if not fails else f'{fails} FAILED'}", flush=True)
  return fails


def _rwkv6_args(strength, b, t, h, kd, vd, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  r = (jax.random.normal(ks[0], (b, t, h, kd)) / kd ** 0.25).astype(dtype)
  k = (jax.random.normal(ks[1], (b, t, h, kd)) / kd ** 0.25).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, vd)).astype(dtype)
  w = _gate(ks[3], "key", strength, b, t, h, kd)
  u = 0.5 * jax.random.normal(ks[4], (h, kd))
  h0 = jax.random.normal(ks[5], (b, h, kd, vd))
  cts = (jax.random.normal(ks[6], (b, t, h, vd)).astype(dtype),
         jax.random.normal(ks[7], (b, h, kd, vd)))
  return (r, k, v, w, u, h0), cts


def _rwkv6(impl):
  if impl.startswith("pallas:"):
    return _rwkv6_variant(*impl.split(":")[1:])
  return lambda r, k, v, w, u, h0: linear_attention.rwkv6(r, k, v, w, u, initial_state=h0,
                                                          impl=impl)


def _gla_cost(b, t, h, kd, vd, chunk=64, bytes_in=2, per_key=False):
  """(fwd bytes, fwd+bwd bytes, fwd flop, fwd+bwd flop) of the chunkwise form.

  Bytes that must move: fwd reads q, k, v and writes o (bf16), plus the float32 gates and the
  states in and out; the backward adds reads of q, k, v, dO and writes of dq, dk, dv.
  Flop per token and head: fwd 2CK + 2CV (intra) + 4KV (inter, state update); the backward
  kernel 6CK + 4CV + 10KV (incl. recomputing the chunk states). Per-key gates: the gate is a
  float32 [B, T, H, K] tensor (read in the forward; read, and its cotangent written, in the
  backward) and C = 16.
  """
  act = b * t * h * kd * bytes_in
  gate = b * t * h * (kd if per_key else 1) * 4
  state = b * h * kd * vd * 4
  fwd_bytes = 4 * act + gate + 2 * state
  fb_bytes = fwd_bytes + 7 * act + 2 * gate + 2 * state
  n = b * t * h
  fwd_flop = n * (2 * chunk * kd + 2 * chunk * vd + 4 * kd * vd)
  bwd_flop = n * (6 * chunk * kd + 4 * chunk * vd + 10 * kd * vd)
  return fwd_bytes, fb_bytes, fwd_flop, fwd_flop + bwd_flop


def time_fla(kind, b, t, h, kd, vd):
  """fla hook (the lead times fla separately): times fla's matching kernel if installed."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from fla.ops.gla import chunk_gla  # pylint: disable=import-outside-toplevel
    from fla.ops.simple_gla import chunk_simple_gla  # pylint: disable=import-outside-toplevel
  except Exception:  # pylint: disable=broad-except
    print(f"  fla ({kind}): fla not installed", flush=True)
    return
  try:
    dev = "cuda"
    mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(b, t, h, kd), mk(b, t, h, kd), mk(b, t, h, vd)
    kw = {}
    if kind == "fixed":
      kw["g_gamma"] = -torch.rand(h, device=dev).clamp_min(0.01)
    elif kind == "scalar":
      kw["g"] = torch.nn.functional.logsigmoid(torch.randn(b, t, h, device=dev)).requires_grad_()
    if kind == "key":
      gk = torch.nn.functional.logsigmoid(torch.randn(b, t, h, kd, device=dev)).requires_grad_()
      fwd = lambda: chunk_gla(q, k, v, gk, output_final_state=True)
    else:
      fwd = lambda: chunk_simple_gla(q, k, v, **kw, output_final_state=True)
    def fb():
      o, _ = fwd()
      o.sum().backward()
    for name, fn in (("fwd", fwd), ("fwd+bwd", fb)):
      for _ in range(3):
        fn()
      torch.cuda.synchronize()
      times = []
      for _ in range(_REPS):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
      times.sort()
      fla_name = "chunk_gla" if kind == "key" else "chunk_simple_gla"
      print(f"  fla {fla_name} ({kind}) {name}: {1e3 * times[len(times) // 2]:.3f} ms",
            flush=True)
  except Exception as e:  # pylint: disable=broad-except
    print(f"  fla ({kind}): failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}",
          flush=True)


def time_rows(shapes=((8, 4096),), h=16, kd=128, vd=128, full=False, deadline=None):
  """Times the rows; stops starting new rows once time.perf_counter() passes `deadline`.

  Default: pallas for every row, chunked for the fixed and scalar gates. full: chunked for
  every row (its per-key compile is slow), the static-block variants, and B=2 T=16384."""
  print(f"== timing (bf16, H={h}, K=V={kd}; floor at {_COPY_BYTES_PER_S / 1e12:.1f} TB/s; "
        f"fwd+bwd = grads of every input)")
  print(f"{'row':<22}{'impl':<40}{'B':>3}{'T':>7} {'fwd ms':>8} {'f+b ms':>8} {'peak GiB':>9} "
        f"{'floor f':>8} {'floor fb':>8} {'TF/s f':>7} {'TF/s fb':>7}", flush=True)
  for b, t in shapes:
    fb_bytes_row = None
    for kind in ("fixed", "scalar", "key", "rwkv6", "none"):
      row = {"fixed": "gla fixed [H]", "scalar": "gla scalar [B,T,H]", "none": "gla no gate",
             "key": "gla per-key", "rwkv6": "rwkv6"}[kind]
      fwd_bytes, fb_bytes, fwd_flop, fb_flop = _gla_cost(
          b, t, h, kd, vd, chunk=16 if kind in ("key", "rwkv6") else 64,
          per_key=kind in ("key", "rwkv6"))
      fb_bytes_row = fb_bytes
      impls = (("pallas", _SEQ, "chunked") if full or kind in ("fixed", "scalar")
               else ("pallas",))
      if kind in ("key", "rwkv6"):
        impls = tuple(i for i in impls if i != _SEQ) + (_KEY_SEQ,)
      if full and kind == "scalar" and t == 4096:
        impls += _VARIANTS
      if full and kind in ("key", "rwkv6") and t == 4096:
        impls += _KEY_VARIANTS
      for impl in impls:
        if deadline is not None and time.perf_counter() > deadline:
          print(f"{row:<22}{impl:<40}{b:>3}{t:>7} skipped: time budget spent", flush=True)
          continue
        try:
          if kind == "rwkv6":
            args, cts = _rwkv6_args("weak", b, t, h, kd, vd, jnp.bfloat16)
            fn = _rwkv6(impl)
          else:
            args, cts = _gla_args(kind, "weak", b, t, h, h, kd, vd, jnp.bfloat16)
            fn = _gla(impl)
          fwd = jax.jit(fn)
          fb = jax.jit(functools.partial(_vjp_all, fn))
          ms_f = _timing.median_ms(fwd, *args, reps=_REPS)
          ms_fb = _timing.median_ms(fb, args, cts, reps=_REPS)
          mem = _timing.peak_bytes(fb, args, cts) / 2**30
          res = (f"{ms_f:8.3f} {ms_fb:8.3f} {mem:9.2f} "
                 f"{fwd_bytes / _COPY_BYTES_PER_S * 1e3:8.3f} "
                 f"{fb_bytes_row / _COPY_BYTES_PER_S * 1e3:8.3f} "
                 f"{fwd_flop / ms_f / 1e9:7.1f} {fb_flop / ms_fb / 1e9:7.1f}")
        except Exception as e:  # pylint: disable=broad-except
          res = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        print(f"{row:<22}{impl:<40}{b:>3}{t:>7} {res}", flush=True)
      if t == 4096 and kind != "rwkv6" and full:
        time_fla(kind, b, t, h, kd, vd)


def _budget_s(default: float) -> float:
  """Seconds the default run may spend before it stops starting rows ($SEQMIX_BENCH_BUDGET_S)."""
  return float(os.environ.get("SEQMIX_BENCH_BUDGET_S", default))


def main(argv=None):
  """Default run: lean correctness + the main rows at B=8 T=4096 within ~90 s.

  `--full`: every correctness case, chunked for every row, the static-block variants,
  B=2 T=16384, and the fla hook (`time_fla`). `--timing_only`: no correctness pass (for a run
  right after one that passed it on the same device; the output says it was skipped)."""
  args = sys.argv[1:] if argv is None else argv
  full = "--full" in args
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
        f"{' (--full)' if full else ''}", flush=True)
  t0 = time.perf_counter()
  if "--timing_only" in args:
    print("correctness: SKIPPED (--timing_only)", flush=True)
  elif full:
    check_correctness(cases=_all_cases())
  else:
    check_correctness(b=1, t=500)
  time_rows(shapes=((8, 4096), (2, 16384)) if full else ((8, 4096),), full=full,
            deadline=None if full else t0 + _budget_s(150.0))
  print(f"total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
  main()
