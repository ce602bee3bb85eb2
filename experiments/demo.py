"""`make demo`: a small MQAR grid through the sweep harness, then a tiny char-level model.

  python -m experiments.demo

Runs on a CPU (2 cores). The MQAR part is `experiments.sweep` on a small grid: every mixer in
DEMO_MIXERS that is registered (others are skipped with a note) × d_model in DEMO_D_MODELS,
T=64 with 4 key-value pairs and a vocabulary of 256, one learning rate, DEMO_STEPS steps. Its
results go to out/demo/mqar_sweep.jsonl (rerunning the demo skips the finished cells; delete
the file to train again); it prints the best-of-lrs table and saves the accuracy-vs-d_model
plot (PNG + SVG) to out/demo/plots/. Then, if the tinyshakespeare corpus is on this machine
($SEQMIX_DATA_DIR or the user cache; nothing is downloaded), it trains a small char-level
model briefly and prints a sample.
"""

import os
import shutil
import time

import jax

from experiments.configs import shakespeare_char as sc_config
from seqmix import registry
from seqmix.train import loop

DEMO_MIXERS = ["mha", "gla", "mamba2", "hawk"]
DEMO_D_MODELS = [32, 64]
DEMO_STEPS = 500
OUT = os.path.join("out", "demo")
RESULTS = os.path.join(OUT, "mqar_sweep.jsonl")


def demo_cells(mixers=None) -> list:
  """The demo's MQAR grid (experiments.sweep cells)."""
  from experiments import sweep  # pylint: disable=g-import-not-at-top
  return sweep.grid(task="mqar", mixers=list(mixers or DEMO_MIXERS), d_models=DEMO_D_MODELS,
                    seq_lens=[64], lrs=[3e-3], steps=DEMO_STEPS, batch=64,
                    train_examples=20_000, test_examples=512,
                    task_kwargs={"vocab_size": 256, "num_kv_pairs": 4})


def shakespeare_demo_config():
  c = sc_config.get_config("mixer=mha,smoke")
  c.model.update(d_model=64, n_layers=2, max_len=64)
  c.model.mixer_kwargs = {"mha": {"num_heads": 4, "position": "none"}}
  c.train.update(seq_len=64, batch_size=16, steps=300, decay_steps=300, warmup_steps=20,
                 log_every=50, ckpt_every=0, sample_tokens=200, sample_prompt_len=16)
  return c


def _fresh(path: str) -> str:
  shutil.rmtree(path, ignore_errors=True)
  return path


def run_mqar() -> tuple[str, list[str]]:
  """The grid through experiments.sweep; returns (the table, the plot paths)."""
  from experiments import plots, sweep  # pylint: disable=g-import-not-at-top
  available = set(registry.names())
  for mixer in DEMO_MIXERS:
    if mixer not in available:
      print(f"[demo] skipping {mixer!r}: not registered in this checkout.")
  cells = demo_cells([m for m in DEMO_MIXERS if m in available])
  print(f"[demo] MQAR (T=64, 4 pairs, V=256): {len(cells)} cells, {DEMO_STEPS} steps each, "
        f"results {RESULTS}")
  t0 = time.time()
  counts = sweep.run_grid(cells, RESULTS, log_every=100)
  print(f"[demo] {counts} in {time.time() - t0:.0f} s")
  keys = {c.key for c in cells}
  records = [r for r in sweep.load_results(RESULTS) if r["key"] in keys]
  paths = plots.make_plots(RESULTS, os.path.join(OUT, "plots"), which=["accuracy_vs_d_model"])
  return sweep.table(records), paths


def corpus_available() -> bool:
  from seqmix.data import corpora  # pylint: disable=g-import-not-at-top
  try:
    corpora.corpus_path("tinyshakespeare", download=False)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def main() -> None:
  print(f"[demo] JAX {jax.__version__} on {jax.default_backend()}")
  os.makedirs(OUT, exist_ok=True)
  table, paths = run_mqar()
  print("\nMQAR accuracy over the scored positions (T=64, 4 pairs, V=256, "
        f"{DEMO_STEPS} steps, lr 3e-3 on "
        "this machine).\nA small, equal budget: it shows how fast each mixer learns recall, not "
        "where it ends (README: MQAR on the H200).")
  print(table)
  print(f"[demo] plot saved to {paths[0] if paths else '(none: no cell finished)'}")
  if "mha" not in registry.names():
    print("[demo] skipping tinyshakespeare: the 'mha' mixer is not registered.")
  elif not corpus_available():
    print("[demo] skipping tinyshakespeare: corpus not found (set SEQMIX_DATA_DIR to a "
          "directory holding tinyshakespeare.txt).")
  else:
    print("[demo] char-level tinyshakespeare, 300 steps ...")
    summary = loop.train(shakespeare_demo_config(), _fresh(os.path.join(OUT, "shakespeare")))
    print(f"[demo] val loss {summary['val']['loss']:.3f} "
          f"({summary['val']['bits_per_token']:.3f} bits/char)")


if __name__ == "__main__":
  main()
