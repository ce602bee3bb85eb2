"""experiments/feature_table.py: the README feature table renders from the registry and results."""

import json
import os

import pytest

from experiments import feature_table
from seqmix import registry

_README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


@pytest.fixture
def results(tmp_path):
  """A sweep's JSON lines and an mqar_sweep JSON object, with expected cells written below."""
  lines = [
      {"mixer": "mha", "d_model": 64, "T": 256, "lr": 3e-3, "accuracy": 0.9},  # best of lrs
      {"mixer": "mha", "d_model": 64, "T": 256, "lr": 1e-3, "accuracy": 0.5},
      {"mixer": "mha", "d_model": 64, "T": 1024, "accuracy": 0.95},            # other length
      {"mixer": "mha", "d_model": 64, "task": "selective_copy", "accuracy": 0.97},  # other task
      {"mixer": "gla", "config": {"d_model": 64, "T": 256}, "metrics": {"accuracy": 0.25}},
      {"mixer": "gated_deltanet", "d_model": 64, "status": "oom", "requested_bytes": 8e10},
      {"mixer": "gated_deltanet", "d_model": 256, "status": "oom"},
      {"mixer": "gated_deltanet", "d_model": 256, "accuracy": 0.75},  # measured beats OOM
      {"mixer": "not_a_mixer", "d_model": 64, "accuracy": 1.0},
  ]
  jsonl = tmp_path / "sweep.jsonl"
  jsonl.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
  old = tmp_path / "old.json"
  old.write_text(json.dumps({"T": 256, "d_model": 128,
                             "results": {"mha": {"best": 0.961}, "gla": {"best": 0.0622}},
                             "not_measured": {"based": "ran out of GPU memory"}}))
  return [str(jsonl), str(old)]


def _row(block, name):
  rows = [l for l in block.splitlines() if l.startswith(f"| `{name}` |")]
  assert len(rows) == 1, (name, rows)
  return [c.strip() for c in rows[0].strip("|").split("|")]


def test_table_renders_every_mixer_with_its_results(results):
  block = feature_table.table(results)
  assert block.startswith(feature_table.START + "\n") and block.endswith(feature_table.END + "\n")
  header = [c.strip() for c in block.splitlines()[2].strip("|").split("|")]
  assert header == ["mixer", "paper", "year", "family", "op", "decode state", "kernel",
                    "sequence-parallel", "MQAR d=64", "MQAR d=128", "MQAR d=256"]
  for name in registry.names():
    assert len(_row(block, name)) == len(header), name
  assert _row(block, "mha")[2:] == ["2017", "attention", "attention.attention", "KV cache",
                                    "attention", "yes", "0.900", "0.961", "—"]
  assert _row(block, "gla")[2:] == ["2024", "linear-attention", "linear_attention.gla",
                                    "constant", "gla", "yes", "0.250", "0.062", "—"]
  assert _row(block, "gated_deltanet")[6:] == ["delta_rule", "yes", "OOM", "—", "0.750"]
  assert _row(block, "based")[-3:] == ["—", "OOM", "—"]
  assert _row(block, "xlstm")[4].endswith("(pattern: mlstm ×7, slstm)")
  assert "Results for unregistered mixers left out: not_a_mixer." in block


def test_table_without_results_has_no_mqar_columns():
  block = feature_table.table([])
  assert "MQAR d=" not in block and "no results file" in block
  assert len(_row(block, "mamba")) == 8


def test_bad_results_line_names_the_file_and_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"mixer": "mha", "d_model": 64, "accuracy": 1}\n{nope\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
    feature_table.table([str(bad)])
  bad.write_text('{"d_model": 64, "accuracy": 1}\n')
  with pytest.raises(ValueError, match=r"needs 'mixer' and 'd_model'"):
    feature_table.table([str(bad)])


def test_write_replaces_only_the_block_and_check_sees_staleness(tmp_path, results, capsys):
  readme = tmp_path / "README.md"
  readme.write_text(f"# title\n\nbefore\n{feature_table.START}\nold table\n"
                    f"{feature_table.END}\nafter\n")
  args = ["--results", *results]
  assert feature_table.main(args + ["--check", str(readme)]) == 1
  assert feature_table.main(args + ["--write", str(readme)]) == 0
  text = readme.read_text()
  assert text.startswith("# title\n\nbefore\n" + feature_table.table(results))
  assert text.endswith(feature_table.END + "\nafter\n") and "old table" not in text
  assert feature_table.main(args + ["--check", str(readme)]) == 0
  assert feature_table.main(args + ["--write", str(readme)]) == 0 and readme.read_text() == text
  readme.write_text(text.replace("| 0.900 |", "| 0.901 |"))  # a hand edit
  assert feature_table.main(args + ["--check", str(readme)]) == 1
  assert "stale" in capsys.readouterr().err
  readme.write_text("# no markers\n")
  with pytest.raises(ValueError, match="has no feature-table block"):
    feature_table.main(args + ["--write", str(readme)])


def test_readme_table_is_current():
  """Once README.md carries the block, it must match the registry and results."""
  text = open(_README, encoding="utf-8").read()
  if feature_table.START not in text:
    pytest.skip("README.md has no feature-table block yet")
  assert feature_table.main(["--check", _README]) == 0, (
      "README.md's feature table is stale: run python -m experiments.feature_table --write")
