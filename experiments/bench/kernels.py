"""The kernel benchmark (issues 8 and 9): every op's Pallas kernel beside its anchors, one run.

    PYTHONPATH=. python3 -m experiments.bench.kernels [--only scan,attention] [--no-fla]

Runs, each in its own subprocess with a time limit (a kernel that fails to lower or hangs must
not take the other rows with it):
  experiments.bench.kernels_scan              linear_scan, selective_scan
  experiments.bench.kernels_attention         blockwise / causal attention (cuDNN in the same run)
  experiments.bench.kernels_linear_attention  gla (all gate forms), rwkv6
  experiments.bench.kernels_delta_rule        delta_rule, with and without the gate
  experiments.bench.fla_anchor                fla's Triton kernels and torch SDPA (if fla is there)
Each part checks its kernel against the op's reference on this GPU before it times anything,
and prints its own table; with $OUT set (the device tool), each part's full log is written to
$OUT/<part>.log as well.
"""

import argparse
import os
import subprocess
import sys
import time

PARTS = {
    "scan": "experiments.bench.kernels_scan",
    "attention": "experiments.bench.kernels_attention",
    "linear_attention": "experiments.bench.kernels_linear_attention",
    "delta_rule": "experiments.bench.kernels_delta_rule",
    "fla": "experiments.bench.fla_anchor",
}


def ceilings():
  """Measured copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
  import jax
  import jax.numpy as jnp
  from experiments.bench import _timing
  x = jax.random.normal(jax.random.PRNGKey(0), (1 << 28,), jnp.float32)  # 1 GiB
  copy = jax.jit(lambda x: x * 1.0001)
  ms = _timing.median_ms(copy, x, reps=20)
  bw = 2 * x.nbytes / (ms / 1e3)
  n = 8192
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  mm = jax.jit(lambda a: a @ a)
  mm_ms = _timing.median_ms(mm, a, reps=20)
  tf = 2 * n**3 / (mm_ms / 1e3) / 1e12
  print(f"ceilings on {jax.devices()[0].device_kind}: copy {bw / 1e12:.2f} TB/s (read+write), "
        f"bf16 {n}^3 matmul {tf:.0f} TFLOP/s", flush=True)
  del x, a


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
  ap.add_argument("--no-fla", action="store_true")
  ap.add_argument("--timeout", type=float, default=240.0, help="seconds per part")
  a = ap.parse_args(argv)
  parts = [p for p in a.only.split(",") if p and not (a.no_fla and p == "fla")]
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    raise SystemExit(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
  out_dir = os.environ.get("OUT")
  # In a subprocess too: JAX preallocates most of the GPU's memory in the process that uses it.
  subprocess.run([sys.executable, "-c",
                  "from experiments.bench.kernels import ceilings; ceilings()"], timeout=120)
  for part in parts:
    t0 = time.time()
    print(f"\n===== {part} ({PARTS[part]}) =====", flush=True)
    try:
      p = subprocess.run([sys.executable, "-m", PARTS[part]], capture_output=True, text=True,
                         timeout=a.timeout)
      log, status = p.stdout + p.stderr, f"exit {p.returncode}"
      print(p.stdout, flush=True)
      if p.returncode:
        print("\n".join(p.stderr.splitlines()[-15:]), flush=True)
    except subprocess.TimeoutExpired as e:
      log = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      status = f"timed out after {a.timeout:.0f} s"
      print(log, flush=True)
    print(f"----- {part}: {status}, {time.time() - t0:.0f} s", flush=True)
    if out_dir:
      with open(os.path.join(out_dir, f"{part}.log"), "w") as f:
        f.write(log)


if __name__ == "__main__":
  main()
