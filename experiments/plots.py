"""Figures from a sweep's results file (experiments/sweep.py), as PNG and SVG.

  python -m experiments.plots --results=out/sweep/mqar.jsonl [--out=out/sweep/plots]

Figures (each one's footer names its data file, the command that drew it and the sweep
command that produced the data; every point is the best learning rate of its group, as
zoology plots):

- `accuracy_vs_d_model`: accuracy vs d_model, a line per mixer, a panel per (task, T)
  (zoology Fig. 2).
- `accuracy_vs_state`: accuracy vs recurrent-state bytes per sequence (the decode cache at
  length T, log x), a point per (mixer, d_model) (the Based paper's Pareto plot).
- `throughput_memory_vs_T`: training tokens/s and memory vs T, log-log, a line per mixer at
  the largest d_model (memory: the device's peak where the backend reports it, else XLA's
  compiled size of the training step; the axis label says which).
- `extrapolation`: accuracy vs evaluation length (log2 x), a line per mixer, a panel per
  d_model; the dotted line is the training length (sweeps run with --extrapolate).
- `loss_curves`: training loss vs step, a line per mixer, a panel per d_model.

A figure whose data the file lacks (no extrapolation, a single T) is skipped with a note.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text (searchable, editable)
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

from experiments import sweep  # pylint: disable=wrong-import-position

FIGURES = ("accuracy_vs_d_model", "accuracy_vs_state", "throughput_memory_vs_T",
           "extrapolation", "loss_curves")


def _ok(records: Iterable[dict]) -> list[dict]:
  return [r for r in sweep.best_of_lrs(records)
          if r["status"] == "ok" and r["metrics"].get("accuracy") is not None]


def _colors(mixers: Sequence[str]) -> dict[str, object]:
  cmap = plt.get_cmap("tab20" if len(mixers) > 10 else "tab10")
  return {m: cmap(i % cmap.N) for i, m in enumerate(sorted(mixers))}


def _footer(fig, results_path: str, records: Sequence[dict]) -> None:
  commands = sorted({r.get("command", "") for r in records if r.get("command")})
  sweep_cmd = commands[0] if commands else "(unknown)"
  if len(commands) > 1:
    sweep_cmd += f"  (+{len(commands) - 1} more)"
  if len(sweep_cmd) > 160:
    sweep_cmd = sweep_cmd[:157] + "..."
  commits = sorted({str(r.get("git_commit"))[:12] for r in records})
  fig.text(0.005, 0.005,
           f"data: {results_path}  (commit {', '.join(commits)})\n"
           f"plot: python -m experiments.plots --results={results_path}\n"
           f"sweep: {sweep_cmd}", fontsize=6, family="monospace", va="bottom", ha="left")


def _panels(n: int, width: float = 4.2, height: float = 3.2):
  cols = min(n, 3)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.7),
                           squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return fig, list(axes.flat[:n])


def _save(fig, out_dir: str, name: str, results_path: str, records) -> list[str]:
  _footer(fig, results_path, records)
  fig.tight_layout(rect=(0, 0.09, 1, 1))
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for ext in ("png", "svg"):
    path = os.path.join(out_dir, f"{name}.{ext}")
    fig.savefig(path, dpi=120)
    paths.append(path)
  plt.close(fig)
  return paths


def accuracy_vs_d_model(records, out_dir, results_path):
  best = _ok(records)
  keys = sorted({(r["config"]["task"], r["config"]["seq_len"]) for r in best})
  if not keys:
    return []
  colors = _colors({r["config"]["mixer"] for r in best})
  fig, axes = _panels(len(keys))
  for ax, (task, t) in zip(axes, keys):
    rs = [r for r in best if (r["config"]["task"], r["config"]["seq_len"]) == (task, t)]
    for mixer in sorted({r["config"]["mixer"] for r in rs}):
      pts = sorted((r["config"]["d_model"], r["metrics"]["accuracy"])
                   for r in rs if r["config"]["mixer"] == mixer)
      ax.plot(*zip(*pts), "o-", color=colors[mixer], label=mixer)
    for r in sweep.best_of_lrs(records):  # groups that did not fit: a cross at 0
      c = r["config"]
      if r["status"] == "oom" and (c["task"], c["seq_len"]) == (task, t):
        ax.plot([c["d_model"]], [0], "x", ms=9, color=colors.get(c["mixer"], "k"))
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("d_model (x: out of memory)")
    ax.set_ylabel("accuracy (best lr)")
    ax.set_title(f"{task}, T={t}")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, ncol=2)
  return _save(fig, out_dir, "accuracy_vs_d_model", results_path, records)


def accuracy_vs_state(records, out_dir, results_path):
  best = [r for r in _ok(records) if r.get("state_bytes")]
  if not best:
    return []
  keys = sorted({(r["config"]["task"], r["config"]["seq_len"]) for r in best})
  colors = _colors({r["config"]["mixer"] for r in best})
  fig, axes = _panels(len(keys), width=4.8, height=3.6)
  for ax, (task, t) in zip(axes, keys):
    rs = [r for r in best if (r["config"]["task"], r["config"]["seq_len"]) == (task, t)]
    for mixer in sorted({r["config"]["mixer"] for r in rs}):
      pts = sorted((r["state_bytes"], r["metrics"]["accuracy"])
                   for r in rs if r["config"]["mixer"] == mixer)  # one point per d_model
      ax.plot(*zip(*pts), "o-", color=colors[mixer], label=mixer)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("decode state per sequence (bytes; attention: KV cache at T)", fontsize=8)
    ax.set_ylabel("accuracy (best lr)")
    ax.set_title(f"{task}, T={t}: accuracy vs state size", fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, ncol=2)
  return _save(fig, out_dir, "accuracy_vs_state", results_path, records)


def throughput_memory_vs_t(records, out_dir, results_path):
  best = _ok(records)
  if len({r["config"]["seq_len"] for r in best}) < 2:
    print("[plots] throughput_memory_vs_T: the file has one T; skipped.")
    return []
  d = max(r["config"]["d_model"] for r in best)
  best = [r for r in best if r["config"]["d_model"] == d]
  colors = _colors({r["config"]["mixer"] for r in best})
  use_peak = all(r.get("peak_bytes") for r in best)
  mem_key = "peak_bytes" if use_peak else "compiled_bytes"
  fig, (ax1, ax2) = _panels(2)
  for mixer in sorted({r["config"]["mixer"] for r in best}):
    rs = sorted((r for r in best if r["config"]["mixer"] == mixer),
                key=lambda r: r["config"]["seq_len"])
    ts = [r["config"]["seq_len"] for r in rs]
    ax1.plot(ts, [r["metrics"]["train_tokens_per_s"] for r in rs], "o-", color=colors[mixer],
             label=mixer)
    mem = [(t, r.get(mem_key)) for t, r in zip(ts, rs) if r.get(mem_key)]
    if mem:
      ax2.plot(*zip(*mem), "o-", color=colors[mixer], label=mixer)
  for ax in (ax1, ax2):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("T")
    ax.grid(alpha=0.3, which="both")
  ooms = [r for r in sweep.best_of_lrs(records)
          if r["status"] == "oom" and r["config"]["d_model"] == d
          and r["oom"].get("bytes_requested")]
  for r in ooms:  # the size a cell that did not fit asked for
    ax2.plot([r["config"]["seq_len"]], [r["oom"]["bytes_requested"]], "x", ms=9,
             color=colors.get(r["config"]["mixer"], "k"))
  if ooms:
    ax2.plot([], [], "x", color="k", label="out of memory (bytes requested)")
    ax2.legend(fontsize=7)
  ax1.set_ylabel("training tokens/s (all vmapped lrs)")
  ax2.set_ylabel("device peak bytes" if use_peak else "compiled step bytes (XLA)")
  ax1.set_title(f"throughput, d_model={d}")
  ax2.set_title(f"memory, d_model={d}")
  ax1.legend(fontsize=7, ncol=2)
  return _save(fig, out_dir, "throughput_memory_vs_T", results_path, records)


def extrapolation(records, out_dir, results_path):
  best = [r for r in _ok(records) if len(r["metrics"].get("accuracy_by_len", {})) > 1]
  if not best:
    print("[plots] extrapolation: no cell was evaluated beyond T (--extrapolate); skipped.")
    return []
  keys = sorted({(r["config"]["task"], r["config"]["seq_len"], r["config"]["d_model"])
                 for r in best})
  colors = _colors({r["config"]["mixer"] for r in best})
  fig, axes = _panels(len(keys))
  for ax, (task, t, d) in zip(axes, keys):
    rs = [r for r in best
          if (r["config"]["task"], r["config"]["seq_len"], r["config"]["d_model"]) == (task, t, d)]
    for r in sorted(rs, key=lambda r: r["config"]["mixer"]):
      pts = sorted((int(k), v) for k, v in r["metrics"]["accuracy_by_len"].items()
                   if v is not None)
      ax.plot(*zip(*pts), "o-", color=colors[r["config"]["mixer"]], label=r["config"]["mixer"])
      for k in r.get("eval_oom", {}):  # lengths that did not fit: a cross on the axis
        ax.plot([int(k)], [0], "x", color=colors[r["config"]["mixer"]])
    ax.axvline(t, color="k", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("evaluation length")
    ax.set_ylabel("accuracy (lr best at T)")
    ax.set_title(f"{task}, trained at T={t}, d_model={d}", fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, ncol=2)
  return _save(fig, out_dir, "extrapolation", results_path, records)


def loss_curves(records, out_dir, results_path):
  best = [r for r in _ok(records) if r["metrics"].get("loss_curve")]
  if not best:
    return []
  keys = sorted({(r["config"]["task"], r["config"]["seq_len"], r["config"]["d_model"])
                 for r in best})
  colors = _colors({r["config"]["mixer"] for r in best})
  fig, axes = _panels(len(keys))
  for ax, (task, t, d) in zip(axes, keys):
    for r in sorted(best, key=lambda r: r["config"]["mixer"]):
      c = r["config"]
      if (c["task"], c["seq_len"], c["d_model"]) != (task, t, d):
        continue
      ax.plot(*zip(*r["metrics"]["loss_curve"]), color=colors[c["mixer"]],
              label=f"{c['mixer']} (lr {c['lr']:g})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    ax.set_title(f"{task}, T={t}, d_model={d}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
  return _save(fig, out_dir, "loss_curves", results_path, records)


_DRAW = {"accuracy_vs_d_model": accuracy_vs_d_model, "accuracy_vs_state": accuracy_vs_state,
         "throughput_memory_vs_T": throughput_memory_vs_t, "extrapolation": extrapolation,
         "loss_curves": loss_curves}


def make_plots(results_path: str, out_dir: str | None = None,
               which: Sequence[str] = FIGURES) -> list[str]:
  """Draw the figures `which` from `results_path` into `out_dir` (default: a `plots` folder
  beside the results file); returns the paths written."""
  unknown = sorted(set(which) - set(FIGURES))
  if unknown:
    raise ValueError(f"Unknown figures {unknown}; known: {list(FIGURES)}.")
  records = sweep.load_results(results_path)
  if not records:
    raise ValueError(f"{results_path} holds no records; run `python -m experiments.sweep "
                     f"--results={results_path}` first.")
  out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(results_path)), "plots")
  paths = []
  for name in which:
    paths += _DRAW[name](records, out_dir, results_path)
  return paths


def define_flags() -> None:
  flags.DEFINE_string("results", "out/sweep/results.jsonl", "Sweep results file.")
  flags.DEFINE_string("out", None, "Output folder (default: <results dir>/plots).")
  flags.DEFINE_list("which", list(FIGURES), "Figures to draw.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  for path in make_plots(f.results, f.out, f.which):
    print(path)


if __name__ == "__main__":
  define_flags()
  app.run(main)
