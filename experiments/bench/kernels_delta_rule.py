"""Pallas delta rule kernel on the device: correctness vs the reference, then timing.

  PYTHONPATH=. python3 -m experiments.bench.kernels_delta_rule

Fits ~2-3 minutes:
(1) Correctness on this backend at a medium shape (B=1, T=500, H=4 value heads over 2 q/k
heads, K=V=128 and K=V=60, float32 and bfloat16, no gate, weak gates, strong gates with -inf
resets):
relative errors of the output, the final state and the gradients of q, k, v, beta, g, h0
against the float32 reference scan, PASS/FAIL against the test tolerances (float32 1e-5,
bfloat16 1e-2), for every backward the kernel has (`ops.BACKWARDS`).
(2) Timing at B=8 T=4096 H=16 K=V=128 bf16, with and without the gate: pallas with each backward
("pallas:pallas" the backward kernel, "pallas:jax" the forward kernel + the VJP of the chunked
form) vs chunked, and for the gated row (weak gates) static-block variants
"pallas:pallas:<block_v>:<warps>"; forward and forward+backward (jit, medians of 20 after
warm-up), XLA's peak memory estimate of forward+backward, the memory-bound floor and the
achieved TFLOP/s.
Every row catches and prints its own exception; rows past the time budget are skipped and say
so.
"""

import functools
import os
import time
import traceback

import jax
import jax.numpy as jnp

from experiments.bench import _timing
from seqmix.ops import _chunk
from seqmix.ops import delta_rule as delta_op
from seqmix.testing import rel_err

# Measured copy bandwidth of the H200 (issue 8); the floor is bytes that must move / this.
_COPY_BYTES_PER_S = 2.8e12
_RTOL = {"float32": 1e-5, "bfloat16": 1e-2}
_REPS = 20


def _args(gate, b, t, h, hk, kd, vd, dtype, seed=0):
  """q ~ N(0, 1), k L2-normalised, beta = sigmoid(N(0, 1)); gate None | weak (log-sigmoid /
  16) | strong (log-sigmoid / 0.05, -14 a step on average) with -inf resets at 5%."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (b, t, hk, kd)).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, hk, kd))
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, vd)).astype(dtype)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h))).astype(dtype)
  g = None
  if gate is not None:
    x = jax.random.normal(ks[4], (b, t, h))
    g = jax.nn.log_sigmoid(x) / (16.0 if gate == "weak" else 0.05)
    if gate == "strong":
      g = jnp.where(jax.random.uniform(ks[5], (b, t, h)) < 0.05, -jnp.inf, g)
  h0 = jax.random.normal(ks[6], (b, h, kd, vd))
  cts = (jax.random.normal(ks[7], (b, t, h, vd)).astype(dtype),
         jax.random.normal(jax.random.fold_in(ks[7], 1), (b, h, kd, vd)))
  return (q, k, v, beta, g, h0), cts


def _fn(impl):
  """"pallas:<backward>[:<block_v>:<num_warps>]" runs the kernel through kernels_pallas
  directly with that backward (and static blocks; default 64 and 4)."""
  if impl.startswith("pallas:"):
    from kernels_pallas.delta_rule import ops  # pylint: disable=import-outside-toplevel
    parts = impl.split(":")
    backward = parts[1]
    blocks = {}
    if len(parts) == 4:
      blocks = {"block_v": int(parts[2]), "num_warps": int(parts[3])}

    def fn(q, k, v, beta, g, h0):
      g = None if g is None else _chunk.clamp_log_gate(g.astype(jnp.float32))
      return ops.delta_rule(q, k, v, beta, g, h0, scale=q.shape[-1] ** -0.5, backward=backward,
                            **blocks)
    return fn
  return lambda q, k, v, beta, g, h0: delta_op.delta_rule(q, k, v, beta, g, initial_state=h0,
                                                          impl=impl)


def _backwards():
  try:
    from kernels_pallas.delta_rule import ops  # pylint: disable=import-outside-toplevel
    return ops.BACKWARDS
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc(limit=3)
    return ()


def _vjp_all(fn, args, cts):
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(cts)


_value_and_grads = jax.jit(_vjp_all, static_argnums=0)

# (gate, K = V, dtype): the correctness cases.
_CASES = [(None, 128, jnp.bfloat16), ("strong", 128, jnp.float32), ("strong", 128, jnp.bfloat16),
          (None, 60, jnp.float32), ("weak", 60, jnp.bfloat16)]


def check_correctness(b=1, t=500, cases=None, deadline=None):
  """Prints one line per case and backward; returns the number of failures."""
  print(f"== correctness: pallas vs reference at B={b} T={t} H=4 over 2 q/k heads; rel. errors "
        "of o, state, then the grads of q, k, v, beta, g (gated only), h0")
  fails = 0
  for gate, kd, dtype in cases or _CASES:
    for backward in _backwards():
      name = (f"delta_rule {str(gate):<6} K=V={kd:<3} {jnp.dtype(dtype).name:<8} "
              f"bwd={backward:<6}")
      if deadline is not None and time.perf_counter() > deadline:
        print(f"{name} skipped: time budget spent", flush=True)
        continue
      try:
        args, cts = _args(gate, b, t, 4, 2, kd, kd, dtype)
        f32 = lambda x: None if x is None else x.astype(jnp.float32)
        with jax.default_matmul_precision("highest"):
          ref = _value_and_grads(_fn("reference"), tuple(map(f32, args)), tuple(map(f32, cts)))
        got = _value_and_grads(_fn(f"pallas:{backward}"), args, cts)
        errs = [rel_err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))
        ok = finite and max(errs) <= _RTOL[jnp.dtype(dtype).name]
        fails += not ok
        print(f"{name} {'PASS' if ok else 'FAIL'} " + " ".join(f"{e:.1e}" for e in errs)
              + ("" if finite else " NON-FINITE"), flush=True)
      except Exception as e:  # pylint: disable=broad-except
        fails += 1
        print(f"{name} FAIL {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        traceback.print_exc(limit=3)
  print(f"== correctness: {'PASS' if not fails else f'{fails} FAILED'}", flush=True)
  return fails


def _cost(b, t, h, kd, vd, chunk=64, bytes_in=2, gated=True):
  """(fwd bytes, fwd+bwd bytes, fwd flop, fwd+bwd flop) of the chunkwise WY form.

  Bytes that must move: fwd reads q, k, v (bf16) and beta (and g), float32 [B, T, H], plus the
  float32 states in and out, and writes o; the backward adds reads of q, k, v, beta, g, dO and
  writes of dq, dk, dv, dbeta, dg (and dh0 / the state cotangent).
  Flop per token and head (forward): k kᵀ, q kᵀ, Wk = T (beta k) 2CK each; U = T (beta v), the
  intra output (q kᵀ ⊙ D) w 2CV each; Wk S, q S, kᵀ w 2KV each: 6CK + 4CV + 6KV (the in-kernel
  triangular solve, ~2C² float32 elementwise per token, is not counted). fwd+bwd counts the
  backward as twice the forward (the usual convention; the exact count depends on the backward).
  """
  act = b * t * h * kd * bytes_in
  tok = b * t * h * 4 * (2 if gated else 1)
  state = b * h * kd * vd * 4
  fwd_bytes = 4 * act + tok + 2 * state
  fb_bytes = fwd_bytes + 7 * act + 2 * tok + 2 * state
  n = b * t * h
  fwd_flop = n * (6 * chunk * kd + 4 * chunk * vd + 6 * kd * vd)
  return fwd_bytes, fb_bytes, fwd_flop, 3 * fwd_flop


# Static-block variants of the kernels (block_v:num_warps; default 64:4), gated row only, timed
# last (the budget may skip them): more warps for the register-heavy backward, narrower V
# blocks (more programs, less state per program), one V block (one triangular solve per head).
_VARIANTS = ("pallas:pallas:64:8", "pallas:pallas:32:4", "pallas:pallas:128:8")


def time_rows(b=8, t=4096, h=16, kd=128, vd=128, deadline=None):
  """Times pallas (every backward) and chunked, with and without the gate."""
  print(f"== timing (bf16, B={b} T={t} H={h}, K=V={kd}; floor at "
        f"{_COPY_BYTES_PER_S / 1e12:.1f} TB/s; fwd+bwd = grads of every input)")
  print(f"{'row':<20}{'impl':<20}{'B':>3}{'T':>7} {'fwd ms':>8} {'f+b ms':>8} {'peak GiB':>9} "
        f"{'floor f':>8} {'floor fb':>8} {'TF/s f':>7} {'TF/s fb':>7}", flush=True)
  for gate in (None, "weak"):
    row = "delta_rule" if gate is None else "delta_rule gated"
    fwd_bytes, fb_bytes, fwd_flop, fb_flop = _cost(b, t, h, kd, vd, gated=gate is not None)
    impls = tuple(f"pallas:{bw}" for bw in _backwards()) + ("chunked",)
    if gate is not None and "pallas" in _backwards():
      impls += _VARIANTS
    for impl in impls:
      if deadline is not None and time.perf_counter() > deadline:
        print(f"{row:<20}{impl:<20}{b:>3}{t:>7} skipped: time budget spent", flush=True)
        continue
      try:
        args, cts = _args(gate, b, t, h, h, kd, vd, jnp.bfloat16)
        fn = _fn(impl)
        fwd = jax.jit(fn)
        fb = jax.jit(functools.partial(_vjp_all, fn))
        ms_f = _timing.median_ms(fwd, *args, reps=_REPS)
        ms_fb = _timing.median_ms(fb, args, cts, reps=_REPS)
        mem = _timing.peak_bytes(fb, args, cts) / 2**30
        res = (f"{ms_f:8.3f} {ms_fb:8.3f} {mem:9.2f} "
               f"{fwd_bytes / _COPY_BYTES_PER_S * 1e3:8.3f} "
               f"{fb_bytes / _COPY_BYTES_PER_S * 1e3:8.3f} "
               f"{fwd_flop / ms_f / 1e9:7.1f} {fb_flop / ms_fb / 1e9:7.1f}")
      except Exception as e:  # pylint: disable=broad-except
        res = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
      print(f"{row:<20}{impl:<20}{b:>3}{t:>7} {res}", flush=True)


def main(argv=None):
  """Correctness at B=1 T=500, then the B=8 T=4096 rows, within ~2-3 minutes."""
  del argv
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}",
        flush=True)
  t0 = time.perf_counter()
  check_correctness(deadline=t0 + 70.0)
  time_rows(deadline=t0 + float(os.environ.get("SEQMIX_BENCH_BUDGET_S", 160.0)))
  print(f"total {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
  main()
