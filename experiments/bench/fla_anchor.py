"""The anchors of the kernel benchmark: fla's Triton kernels and torch SDPA, timed on this GPU.

    PYTHONPATH=. python3 -m experiments.bench.fla_anchor [--T 4096 --B 8 --timeout 75]

fla is not a dependency of seqmix: its wheel (fla-core, pure Python over Triton) is carried to the
device for the benchmark only and imported from there. Each row runs in its own subprocess
with a wall-clock limit, because some fla kernels take minutes to compile on Hopper (issue 8:
`chunk_gla` and `chunk_rwkv6` did not finish compiling within 80 s) and some refuse the
installed Triton (fla #640); such a row prints its reason instead of a time.

Shapes are the op contract's `[B, T, H, K]` (fla's default layout), bf16, H=16, K=V=128.
Times are medians of `triton.testing.do_bench` (CUDA events), in ms; forward+backward is one
forward and one backward of `sum(o * cot)` with a fixed random cotangent.
"""

import argparse
import json
import subprocess
import sys

ROWS = ("simple_gla_gamma", "simple_gla_g", "gla", "rwkv6", "delta_rule", "gated_delta_rule",
        "torch_sdpa")


def _inputs(name, b, t, h=16, d=128):
  import torch
  import torch.nn.functional as F
  dev, dt = "cuda", torch.bfloat16
  g = torch.Generator(device=dev).manual_seed(0)
  rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)
  q, k, v = rnd(b, t, h, d), rnd(b, t, h, d), rnd(b, t, h, d)
  logsig = lambda x: F.logsigmoid(x.float())
  if name == "simple_gla_gamma":
    from fla.ops.simple_gla import chunk_simple_gla
    gamma = torch.log(1 - 2.0 ** (-5 - torch.arange(h, device=dev, dtype=torch.float32)))
    return (lambda q, k, v: chunk_simple_gla(q, k, v, g_gamma=gamma)[0]), [q, k, v]
  if name == "simple_gla_g":
    from fla.ops.simple_gla import chunk_simple_gla
    gg = (logsig(rnd(b, t, h)) / 16).requires_grad_()
    return (lambda q, k, v, gg: chunk_simple_gla(q, k, v, g=gg)[0]), [q, k, v, gg]
  if name == "gla":
    from fla.ops.gla import chunk_gla
    gk = (logsig(rnd(b, t, h, d)) / 16).requires_grad_()
    return (lambda q, k, v, gk: chunk_gla(q, k, v, gk)[0]), [q, k, v, gk]
  if name == "rwkv6":
    from fla.ops.rwkv6 import chunk_rwkv6
    w = (logsig(rnd(b, t, h, d)) / 16).requires_grad_()
    u = (0.1 * torch.randn(h, d, device=dev, generator=g)).to(dt).requires_grad_()
    return (lambda r, k, v, w, u: chunk_rwkv6(r, k, v, w, u, scale=1.0)[0]), [q, k, v, w, u]
  if name in ("delta_rule", "gated_delta_rule"):
    kn = F.normalize(k.float(), dim=-1).to(dt)
    beta = torch.sigmoid(rnd(b, t, h).float()).to(dt).requires_grad_()
    if name == "delta_rule":
      from fla.ops.delta_rule import chunk_delta_rule
      return (lambda q, k, v, bt: chunk_delta_rule(q, k, v, bt)[0]), [q, kn, v, beta]
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    gg = (logsig(rnd(b, t, h)) / 16).requires_grad_()
    return (lambda q, k, v, gg, bt: chunk_gated_delta_rule(q, k, v, gg, bt)[0]), \
        [q, kn, v, gg, beta]
  if name == "torch_sdpa":
    # SDPA takes [B, H, T, D].
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    return sdpa, [q, k, v]
  raise ValueError(f"unknown row {name!r}; rows: {ROWS}")


def _run_row(name, b, t):
  """Times one row in this process; prints one JSON line."""
  import torch
  from triton.testing import do_bench
  fn, args = _inputs(name, b, t)
  args = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
  with torch.no_grad():
    fwd = do_bench(lambda: fn(*args), warmup=25, rep=100, return_mode="median")
  out = fn(*args)
  cot = torch.randn_like(out)

  def fwd_bwd():
    for a in args:
      a.grad = None
    (fn(*args).float() * cot.float()).sum().backward()

  try:
    both = do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
    peak = None
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    res = {"row": name, "fwd_ms": fwd, "fwd_bwd_ms": both, "peak_gib": peak}
  except Exception as e:  # fla refuses some backwards on this Triton (fla #640)
    res = {"row": name, "fwd_ms": fwd, "fwd_bwd_ms": None,
           "note": f"backward: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
  print(json.dumps(res), flush=True)


def run(rows=ROWS, b=8, t=4096, timeout=75.0):
  """Every row in a subprocess with a time limit; returns {row: result dict}."""
  results = {}
  for name in rows:
    cmd = [sys.executable, "-m", "experiments.bench.fla_anchor", "--row", name,
           "--B", str(b), "--T", str(t)]
    try:
      p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
      lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
      if lines:
        results[name] = json.loads(lines[-1])
      else:
        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
        results[name] = {"row": name, "note": f"failed: {err[:160]}"}
    except subprocess.TimeoutExpired:
      results[name] = {"row": name, "note": f"did not finish within {timeout:.0f} s "
                                            "(compile + timing)"}
  return results


def _fmt(x):
  return "—" if x is None else f"{x:.3f}"


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--row", default=None)
  ap.add_argument("--B", type=int, default=8)
  ap.add_argument("--T", type=int, default=4096)
  ap.add_argument("--timeout", type=float, default=75.0)
  ap.add_argument("--rows", default=",".join(ROWS))
  a = ap.parse_args(argv)
  if a.row:
    _run_row(a.row, a.B, a.T)
    return
  try:
    import fla  # noqa: F401
  except ImportError:
    print("fla not installed: carry the fla-core wheel (README, Benchmarks)")
  res = run(a.rows.split(","), a.B, a.T, a.timeout)
  print(f"anchors B={a.B} T={a.T} H=16 K=V=128 bf16 (ms, median of do_bench)")
  print(f"{'row':<18} {'fwd':>8} {'fwd+bwd':>8} {'peak GiB':>9}  note")
  for name, r in res.items():
    print(f"{name:<18} {_fmt(r.get('fwd_ms')):>8} {_fmt(r.get('fwd_bwd_ms')):>8} "
          f"{_fmt(r.get('peak_gib')):>9}  {r.get('note', '')}", flush=True)
  return res


if __name__ == "__main__":
  main()
