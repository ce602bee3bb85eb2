"""The full shakespeare_char run of seqmix beside nanoGPT's, same machine, same run (issue 16).

  python -m experiments.bench.shakespeare_vs_nanogpt --nanogpt_dir=DIR [--workdir=/tmp/svn]
      [--steps=5000] [--out=$OUT]

1. nanoGPT: `data/shakespeare_char/prepare.py`, then its own `train.py
   config/train_shakespeare_char.py` (torch.compile, bf16 autocast; its defaults: eval every
   250 iterations on eval_iters=200 random batches of each split, checkpoint of the best
   validation loss). Wall time, the logged per-iteration times and its eval curve are parsed
   from its output.
2. seqmix: `python -m experiments.train --config experiments/configs/shakespeare_char.py` (the
   like-for-like config), wall time and its eval curve (the whole validation split every 250
   steps) parsed from its console.
3. One estimator for both: nanoGPT's best checkpoint (ckpt.pt) is scored in torch on the WHOLE
   validation split exactly as seqmix scores it (`seqmix.data.text.validation_windows`:
   consecutive non-overlapping 256-token windows, every target once, token-weighted mean).
   Both estimators average the same per-position losses (a window's positions 0..255 each
   weigh the same); nanoGPT's adds the sampling noise of 200 x 64 random windows.

Prints one table (wall s, median ms/iteration, best validation loss with each system's own
estimator and with the whole-split one, the step of the best) and writes
`shakespeare_vs_nanogpt.json` and a curves plot (PNG) to --out. A benchmark, never a test.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from seqmix.data import corpora

_NANOGPT_DIR = flags.DEFINE_string(
    "nanogpt_dir", None, "A nanoGPT checkout (its data/shakespeare_char/input.txt, when missing, "
    "is copied from the seqmix corpus).", required=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/shakespeare_vs_nanogpt", "Scratch directory.")
_STEPS = flags.DEFINE_integer("steps", 5000, "Iterations of each run (nanoGPT's max_iters).")
_OUT = flags.DEFINE_string("out", os.environ.get("OUT", "."), "Where the JSON and plot go.")
_SKIP_NANOGPT = flags.DEFINE_bool("skip_nanogpt", False, "Run only seqmix (for a smoke test).")
_CONFIG_ARG = flags.DEFINE_string("config_arg", "mixer=mha", "Argument of the seqmix config.")

# The torch side of step 3, run by nanoGPT's interpreter in its checkout (it imports model.py).
_SCORE_NANOGPT = r"""
import json, os, sys, numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, os.getcwd())  # nanoGPT's checkout (the cwd), where model.py is
from model import GPT, GPTConfig
ck = torch.load(sys.argv[1], map_location="cuda", weights_only=False)
model = GPT(GPTConfig(**ck["model_args"]))
model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()})
model.to("cuda").eval()
val = np.fromfile("data/shakespeare_char/val.bin", dtype=np.uint16).astype(np.int64)
T, B = ck["model_args"]["block_size"], 64
n_win = -(-(len(val) - 1) // T)
total, count = 0.0, 0
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
  for s in range(0, n_win, B):
    rows = []
    for w in range(s, min(s + B, n_win)):
      x = val[w * T: w * T + T + 1]
      inp = np.zeros(T, np.int64); tgt = np.full(T, -1, np.int64)
      inp[:len(x) - 1] = x[:-1]; tgt[:len(x) - 1] = x[1:]
      rows.append((inp, tgt))
    inp = torch.tensor(np.stack([r[0] for r in rows]), device="cuda")
    tgt = torch.tensor(np.stack([r[1] for r in rows]), device="cuda")
    logits, _ = model(inp, tgt)
    total += F.cross_entropy(logits.float().view(-1, logits.size(-1)), tgt.view(-1),
                             ignore_index=-1, reduction="sum").item()
    count += int((tgt >= 0).sum())
print(json.dumps({"iter": ck["iter_num"], "own_best": float(ck["best_val_loss"]),
                  "whole_split": total / count, "targets": count}))
"""


def _run(cmd, cwd=None, log=None):
  """Runs `cmd`, streaming nothing; returns (stdout+stderr, wall seconds)."""
  t0 = time.perf_counter()
  p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  out = p.stdout + p.stderr
  if log:
    with open(log, "w") as f:
      f.write(out)
  if p.returncode:
    raise RuntimeError(f"{cmd[:4]} exited {p.returncode}:\n{out[-3000:]}")
  return out, wall


def run_nanogpt(path, steps, out_dir):
  """nanoGPT's full run; returns its summary dict."""
  py = sys.executable
  data = os.path.join(path, "data", "shakespeare_char")
  if not os.path.exists(os.path.join(data, "input.txt")):
    # The same checksummed corpus seqmix trains on (prepare.py would download it otherwise).
    shutil.copyfile(corpora.corpus_path("tinyshakespeare"), os.path.join(data, "input.txt"))
  if not os.path.exists(os.path.join(data, "val.bin")):
    _run([py, "data/shakespeare_char/prepare.py"], cwd=path)
  ng_out = os.path.join(out_dir, "nanogpt_run")
  out, wall = _run([py, "train.py", "config/train_shakespeare_char.py", f"--max_iters={steps}",
                    f"--lr_decay_iters={steps}", f"--out_dir={ng_out}"], cwd=path,
                   log=os.path.join(out_dir, "nanogpt.log"))
  curve = [(int(s), float(tr), float(va)) for s, tr, va in
           re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", out)]
  iters = [float(ms) for it, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out)
           if int(it) > 50]
  script = os.path.join(out_dir, "score_nanogpt.py")
  with open(script, "w") as f:
    f.write(_SCORE_NANOGPT)
  score_out, _ = _run([py, script, os.path.join(ng_out, "ckpt.pt")], cwd=path)
  score = json.loads([l for l in score_out.splitlines() if l.startswith("{")][-1])
  best = min(curve, key=lambda c: c[2]) if curve else (None, None, None)
  # nanoGPT logs the time of every 10th iteration (log_interval=10), each including a sync
  return {"system": "nanoGPT", "wall_s": wall, "ms_per_iter": statistics.median(iters)
          if iters else None, "curve": curve, "best_own": best[2], "best_step": best[0],
          "best_whole_split": score["whole_split"], "best_ckpt_iter": score["iter"]}


def run_seqmix(workdir, steps, config_arg, out_dir):
  """seqmix's run through experiments.train from scratch; returns its summary dict."""
  shutil.rmtree(workdir, ignore_errors=True)  # a leftover checkpoint would resume, not rerun
  cmd = [sys.executable, "-m", "experiments.train",
         f"--config=experiments/configs/shakespeare_char.py:{config_arg}",
         f"--workdir={workdir}", f"--config.train.steps={steps}",
         f"--config.train.decay_steps={steps}"]
  out, wall = _run(cmd, log=os.path.join(out_dir, "seqmix.log"))
  curve = [(int(s), float(v)) for s, v in
           re.findall(r"step (\d+): val/loss ([\d.]+)", out)]
  train = {int(s): float(v) for s, v in re.findall(r"step (\d+): train/loss ([\d.]+)", out)}
  tok_s = [float(v) for v in re.findall(r"train/tokens_per_s ([\d.e+]+)", out)]
  best = min(curve, key=lambda c: c[1]) if curve else (None, None)
  ms = None
  if tok_s:
    # tokens/s of each logging window (the loop's own wall clock); the first tenth compiles
    from experiments.configs import shakespeare_char  # pylint: disable=import-outside-toplevel
    t = shakespeare_char.get_config(config_arg).train
    ms = t.batch_size * t.seq_len / statistics.median(tok_s[len(tok_s) // 10:]) * 1e3
  return {"system": "seqmix", "wall_s": wall, "ms_per_iter": ms,
          "curve": [(s, train.get(s), v) for s, v in curve], "best_own": best[1],
          "best_step": best[0], "best_whole_split": best[1], "best_ckpt_iter": best[0]}


def plot(results, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for r in results:
    c = [x for x in r["curve"] if x[2] is not None]
    ax.plot([x[0] for x in c], [x[2] for x in c], marker="o", ms=3,
            label=f"{r['system']} val (own estimator)")
  ax.set_xlabel("iteration")
  ax.set_ylabel("validation loss (nats/char)")
  ax.set_ylim(1.4, 2.0)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  os.makedirs(_WORKDIR.value, exist_ok=True)
  os.makedirs(_OUT.value, exist_ok=True)
  results = []
  if not _SKIP_NANOGPT.value:
    try:
      results.append(run_nanogpt(os.path.abspath(_NANOGPT_DIR.value), _STEPS.value,
                                 _WORKDIR.value))
    except Exception as e:  # pylint: disable=broad-except
      print(f"nanoGPT run failed: {e}", flush=True)
  results.append(run_seqmix(os.path.join(_WORKDIR.value, "seqmix_run"), _STEPS.value,
                            _CONFIG_ARG.value, _WORKDIR.value))
  print(f"shakespeare_char, {_STEPS.value} iterations (whole-split estimator: "
        "every validation target once, token-weighted mean)")
  print(f"{'system':<9}{'wall s':>8}{'ms/iter':>9}{'best val (own)':>16}{'at':>6}"
        f"{'best val (whole split)':>24}")
  fmt = lambda x, f: "—".rjust(int(f[:-1].split(".")[0])) if x is None else format(x, f)
  for r in results:
    print(f"{r['system']:<9}{fmt(r['wall_s'], '8.0f')}{fmt(r['ms_per_iter'], '9.2f')}"
          f"{fmt(r['best_own'], '16.4f')}{fmt(r['best_step'], '6d')}"
          f"{fmt(r['best_whole_split'], '24.4f')}")
  with open(os.path.join(_OUT.value, "shakespeare_vs_nanogpt.json"), "w") as f:
    json.dump(results, f, indent=1)
  try:
    plot(results, os.path.join(_OUT.value, "shakespeare_vs_nanogpt.png"))
  except Exception as e:  # pylint: disable=broad-except
    print(f"plot failed: {e}")


if __name__ == "__main__":
  app.run(main)
