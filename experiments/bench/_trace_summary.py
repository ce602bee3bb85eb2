"""Per-line totals of a `jax.profiler` Perfetto trace: what the device did per step.

    python -m experiments.bench._trace_summary DIR [--steps=N]

`jax.profiler.trace(DIR, create_perfetto_trace=True)` writes `perfetto_trace.json.gz` under
DIR. Its events sit on lines (pid = a device or the host, tid = a stream or a thread, each
named by metadata events). For every line this prints the number of events and their summed
duration, divided by `steps`, and the line's span (first start to last end): on a GPU line
the summed kernel time per step against the span per step says how busy the device was.
"""

import collections
import glob
import gzip
import json
import os
import sys


def find_trace(directory: str) -> str | None:
  paths = glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"), recursive=True)
  return max(paths, key=os.path.getmtime) if paths else None


def line_totals(path: str) -> list[dict]:
  """One dict per (pid, tid) line: process, thread, events, total_us, span_us."""
  with gzip.open(path, "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs, threads = {}, {}
  lines = collections.defaultdict(lambda: {"events": 0, "total_us": 0.0, "start": None,
                                           "end": None})
  for e in events:
    if e.get("ph") == "M":
      if e.get("name") == "process_name":
        procs[e["pid"]] = e["args"].get("name", "")
      elif e.get("name") == "thread_name":
        threads[(e["pid"], e["tid"])] = e["args"].get("name", "")
      continue
    if e.get("ph") != "X" or "dur" not in e:
      continue
    line = lines[(e["pid"], e.get("tid"))]
    line["events"] += 1
    line["total_us"] += float(e["dur"])
    ts = float(e["ts"])
    line["start"] = ts if line["start"] is None else min(line["start"], ts)
    end = ts + float(e["dur"])
    line["end"] = end if line["end"] is None else max(line["end"], end)
  out = []
  for (pid, tid), line in lines.items():
    out.append({"process": procs.get(pid, str(pid)), "thread": threads.get((pid, tid), str(tid)),
                "events": line["events"], "total_us": line["total_us"],
                "span_us": line["end"] - line["start"]})
  return sorted(out, key=lambda r: -r["total_us"])


def summarize(directory: str, steps: int, top: int = 14) -> str:
  path = find_trace(directory)
  if path is None:
    return f"(no perfetto trace under {directory})"
  rows = line_totals(path)
  text = [f"trace {path}: per step over {steps} steps (ms; events)",
          f"{'process':<34} {'thread':<34} {'events':>8} {'busy ms':>9} {'span ms':>9}"]
  for r in rows[:top]:
    text.append(f"{r['process'][:34]:<34} {r['thread'][:34]:<34} {r['events'] / steps:8.1f} "
                f"{r['total_us'] / 1e3 / steps:9.3f} {r['span_us'] / 1e3 / steps:9.3f}")
  return "\n".join(text)


if __name__ == "__main__":
  n = 1
  for a in sys.argv[2:]:
    if a.startswith("--steps="):
      n = int(a.split("=", 1)[1])
  print(summarize(sys.argv[1], n))
