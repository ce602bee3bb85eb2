"""experiments/plots.py renders every figure from a small fixture results file.

fixtures/sweep_results.jsonl holds synthetic numbers (written by run_grid with a fake training
function, not measurements): 3 mixers x d_model {16, 32, 64} x T {32, 64} x 2 lrs, with
extrapolation to 2T and 4T and one out-of-memory group.
"""

import json
import os

import pytest

from experiments import plots
from experiments import sweep

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "sweep_results.jsonl")


def test_every_figure_renders(tmp_path):
  paths = plots.make_plots(FIXTURE, str(tmp_path))
  names = sorted({os.path.splitext(os.path.basename(p))[0] for p in paths})
  assert names == sorted(plots.FIGURES)
  assert len(paths) == 2 * len(plots.FIGURES)  # PNG + SVG each
  for p in paths:
    assert os.path.getsize(p) > 1000, p
    if p.endswith(".png"):
      with open(p, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    else:
      text = open(p).read()
      assert "python -m experiments.plots --results=" + FIXTURE in text  # names its command
      assert "data: " + FIXTURE in text  # and its data file


def test_points_are_best_of_lrs_and_oom_is_left_out():
  records = sweep.load_results(FIXTURE)
  best = plots._ok(records)  # pylint: disable=protected-access
  groups = {r["group"] for r in records}
  assert len(best) == len(groups) - 1  # the oom group has no point
  for r in best:
    same = [q for q in records if q["group"] == r["group"] and q["status"] == "ok"]
    assert r["metrics"]["accuracy"] == max(q["metrics"]["accuracy"] for q in same)


def test_missing_data_skips_figure(tmp_path):
  one_t = tmp_path / "one_t.jsonl"
  with open(one_t, "w") as f:
    for r in sweep.load_results(FIXTURE):
      if r["config"]["seq_len"] == 32:
        r["metrics"] = dict(r.get("metrics") or {}, accuracy_by_len={})
        f.write(json.dumps(r) + "\n")
  paths = plots.make_plots(str(one_t), str(tmp_path / "out"), which=[
      "accuracy_vs_d_model", "throughput_memory_vs_T", "extrapolation"])
  names = {os.path.splitext(os.path.basename(p))[0] for p in paths}
  assert "throughput_memory_vs_T" not in names and "extrapolation" not in names
  assert "accuracy_vs_d_model" in names


def test_errors_name_the_fix(tmp_path):
  with pytest.raises(ValueError, match="experiments.sweep"):
    plots.make_plots(str(tmp_path / "none.jsonl"))
  with pytest.raises(ValueError, match="known"):
    plots.make_plots(FIXTURE, str(tmp_path), which=["nope"])
