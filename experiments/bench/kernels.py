"""The kernel benchmark (issues 8 and 9): every op's Pallas kernel beside its anchors, one run.

    PYTHONPATH=. python3 -m experiments.bench.kernels [--only scan,attention] [--no-fla]

Runs, each in its own subprocess with a time limit (a kernel that fails to lower or hangs must
not take the other rows with it):
  experiments.bench.kernels_scan              linear_scan, selective_scan
  experiments.bench.kernels_attention         blockwise / causal attention (cuDNN in the same run)
  experiments.bench.kernels_linear_attention  gla (all gate forms), delta_rule, rwkv6
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
    "fla": "experiments.bench.fla_anchor",
}


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
