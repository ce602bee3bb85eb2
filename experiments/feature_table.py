"""The README feature table, generated from the registry and MQAR results files.

  python -m experiments.feature_table [--results FILE ...]         # print the block
  python -m experiments.feature_table --write README.md            # replace the block there
  python -m experiments.feature_table --check README.md            # exit 1 if it is stale

One row per registered mixer (by family, then year): paper, year, family, op, decode state,
kernel (the ops with a built Pallas impl, read from the op modules' impl tables), sequence
parallel (registry flag), and MQAR accuracy per d_model found in the results. The block sits
between `<!-- feature-table:start -->` and `<!-- feature-table:end -->`; never edit it by hand.

Results (default: every *.json / *.jsonl file in experiments/results/, in name order):
  - JSON lines, one record per line, as experiments/sweep.py writes them: `mixer`, `d_model`
    (or `d`, or inside `config`), `accuracy` (or inside `metrics`); records of another task
    than MQAR or another length than --T are skipped; a record without an accuracy but with
    a `status` (e.g. "oom") marks its cell with that status.
  - One JSON object as experiments/mqar_sweep.py writes it: `d_model`, `T`, `results`
    {mixer: {"best": accuracy, ...}}, `not_measured` {mixer: reason}.
A cell shows the best accuracy over every record of that mixer and d_model (zoology: best of
the learning rates); a measured accuracy beats a status.
"""

import argparse
import dataclasses
import glob
import json
import os
import sys

from experiments import mixer_facts
from seqmix import registry

START = "<!-- feature-table:start -->"
END = "<!-- feature-table:end -->"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(_ROOT, "experiments", "results")
COMMAND = "python -m experiments.feature_table"


@dataclasses.dataclass
class Cell:
  """One mixer at one d_model: its best accuracy, or why there is none."""
  accuracy: float | None = None
  status: str = ""

  def merge(self, accuracy=None, status=""):
    if accuracy is not None:
      self.accuracy = accuracy if self.accuracy is None else max(self.accuracy, accuracy)
    elif status and not self.status:
      self.status = status

  def __str__(self):
    if self.accuracy is not None:
      return f"{self.accuracy:.3f}"
    return self.status or "—"


def _status(reason: str) -> str:
  reason = str(reason).lower()
  return "OOM" if ("oom" in reason or "out of memory" in reason
                   or "out of gpu memory" in reason) else "not measured"


def _first(record: dict, *keys):
  """The first of `keys` present in record, or in its `config` / `metrics` sub-dicts."""
  for where in (record, record.get("config") or {}, record.get("metrics") or {}):
    for k in keys:
      if isinstance(where, dict) and where.get(k) is not None:
        return where[k]
  return None


def _add_record(cells, record, T, where):
  """One JSON-lines record into cells (skipped when it is of another task or length)."""
  task = str(_first(record, "task") or "mqar").lower()
  t = _first(record, "T", "seq_len")
  if not task.startswith("mqar") or (t is not None and int(t) != T):
    return
  mixer, d = _first(record, "mixer"), _first(record, "d_model", "d")
  if mixer is None or d is None:
    raise ValueError(f"{where}: a record needs 'mixer' and 'd_model' (got keys "
                     f"{sorted(record)}).")
  acc = _first(record, "accuracy", "acc", "mqar_accuracy", "test_accuracy")
  status = _first(record, "status", "error") or ""
  if acc is None and status:
    status = _status(status)
  cells.setdefault((mixer, int(d)), Cell()).merge(None if acc is None else float(acc), status)


def load_results(paths, T: int = 256) -> dict[tuple[str, int], Cell]:
  """(mixer, d_model) -> Cell from the results files (formats in the module docstring)."""
  cells: dict[tuple[str, int], Cell] = {}
  for path in paths:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    try:
      doc = json.loads(text)
    except json.JSONDecodeError:
      doc = None
    if isinstance(doc, dict) and "results" in doc:
      if int(doc.get("T", T)) != T:
        continue
      d = int(doc["d_model"])
      for mixer, r in doc["results"].items():
        cells.setdefault((mixer, d), Cell()).merge(float(r["best"]))
      for mixer, reason in (doc.get("not_measured") or {}).items():
        cells.setdefault((mixer, d), Cell()).merge(status=_status(reason))
      continue
    records = [doc] if isinstance(doc, dict) else []
    if doc is None:
      for i, line in enumerate(text.splitlines()):
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: not JSON ({e}); a results file is one JSON "
                             f"object or JSON lines.") from e
    for i, record in enumerate(records):
      _add_record(cells, record, T, f"{path}:{i + 1}")
  return cells


def default_results() -> list[str]:
  return sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json"))
                + glob.glob(os.path.join(RESULTS_DIR, "*.jsonl")))


def _shown(path: str) -> str:
  """A results path as the README names it: relative to the repository when inside it."""
  full = os.path.abspath(path)
  return os.path.relpath(full, _ROOT) if full.startswith(_ROOT + os.sep) else path


def _md(text: str) -> str:
  return str(text).replace("|", "\\|")


def _runs(names) -> str:
  """("mlstm",) * 7 + ("slstm",) -> "mlstm ×7, slstm"."""
  out = []
  for n in names:
    if out and out[-1][0] == n:
      out[-1][1] += 1
    else:
      out.append([n, 1])
  return ", ".join(n if k == 1 else f"{n} ×{k}" for n, k in out)


def _order(name):
  info = registry.get(name)
  return (registry.FAMILIES.index(info.family), info.year, name)


def table(results=None, T: int = 256) -> str:
  """The Markdown block, markers included (results: paths; None: default_results())."""
  paths = default_results() if results is None else list(results)
  cells = load_results(paths, T)
  names = sorted(registry.names(), key=_order)
  unknown = sorted({m for m, _ in cells} - set(names))
  ds = sorted({d for m, d in cells if m in names})
  head = ["mixer", "paper", "year", "family", "op", "decode state", "kernel",
          "sequence-parallel"] + [f"MQAR d={d}" for d in ds]
  lines = [START, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in names:
    info = registry.get(name)
    paper = f"[{_md(info.paper)}]({info.url})" if info.url else _md(info.paper)
    op = _md(info.op)
    if info.is_pattern:
      op += f" (pattern: {_runs(info.pattern)})"
    kernel = ", ".join(t.split(".")[1] for t in mixer_facts.kernel_ops(info)) or "—"
    row = [f"`{name}`", paper, str(info.year), info.family, op,
           mixer_facts.decode_state(info), kernel, "yes" if info.sequence_parallel else "—"]
    row += [str(cells.get((name, d), Cell())) for d in ds]
    lines.append("| " + " | ".join(row) + " |")
  rel = [_shown(p) for p in paths]
  lines += [
      "",
      f"Generated by `{COMMAND}` from `seqmix.registry` and the op modules' impl tables; do "
      f"not edit by hand. Kernel: the mixer's ops (outside decoding) that have a built Pallas "
      f"impl (`impl=\"pallas\"`). Decode state: constant, or a KV cache that grows with the "
      f"context (bounded by the window where there is one). MQAR: token accuracy at T={T}, "
      f"best over the learning rates and runs in "
      + (", ".join(f"`{p}`" for p in rel) if rel else "no results file")
      + "; — not run, OOM: did not fit in memory."]
  if unknown:
    lines.append(f"Results for unregistered mixers left out: {', '.join(unknown)}.")
  lines += ["", END]
  return "\n".join(lines) + "\n"


def _block_span(text: str, path: str):
  start, end = text.find(START), text.find(END)
  if start < 0 or end < start:
    raise ValueError(f"{path} has no feature-table block: put the two lines {START!r} and "
                     f"{END!r} where the table belongs, then run {COMMAND} --write {path}.")
  return start, end + len(END) + (1 if text[end + len(END):].startswith("\n") else 0)


def replace_block(text: str, block: str, path: str = "README.md") -> str:
  start, end = _block_span(text, path)
  return text[:start] + block + text[end:]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--results", nargs="+", default=None,
                      help="results files (default: experiments/results/*.json, *.jsonl)")
  parser.add_argument("--T", type=int, default=256, help="MQAR sequence length to report")
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--write", nargs="?", const="README.md", metavar="README",
                     help="replace the block in this file")
  group.add_argument("--check", nargs="?", const="README.md", metavar="README",
                     help="exit 1 if this file's block differs from the generated one")
  args = parser.parse_args(argv)
  block = table(args.results, args.T)
  path = args.write or args.check
  if path is None:
    sys.stdout.write(block)
    return 0
  with open(path, encoding="utf-8") as f:
    text = f.read()
  new = replace_block(text, block, path)
  if args.check:
    if new != text:
      print(f"{path}: the feature table is stale; run {COMMAND} --write {path}",
            file=sys.stderr)
      return 1
    print(f"{path}: the feature table is current.")
    return 0
  with open(path, "w", encoding="utf-8") as f:
    f.write(new)
  print(f"{path}: feature table written ({len(registry.names())} mixers).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
