"""`make demo`: a few mixers on a small MQAR task, then a tiny char-level Shakespeare model.

  python -m experiments.demo

Runs on a CPU in about six minutes (2 cores). For each mixer in DEMO_MIXERS that is
registered (others are skipped with a note) it trains a 2-layer model on MQAR (T=64, 4
key-value pairs, vocabulary 256), prints the validation accuracy per mixer and saves a bar plot to
out/demo/mqar_accuracy.png. Then, if the tinyshakespeare corpus is on this machine
($SEQMIX_DATA_DIR or the user cache; nothing is downloaded), it trains a small char-level
model briefly and prints a sample.
"""

import os
import shutil
import time

import jax

from experiments.configs import mqar as mqar_config
from experiments.configs import shakespeare_char as sc_config
from seqmix import registry
from seqmix.train import loop

DEMO_MIXERS = ["mha", "gla", "mamba2", "hawk"]
OUT = os.path.join("out", "demo")


def mqar_demo_config(mixer: str):
  c = mqar_config.get_config(f"mixer={mixer},smoke")
  c.data.update(vocab_size=256, num_kv_pairs=4, num_train_examples=20_000,
                num_test_examples=512)
  c.model.update(d_model=64, max_len=64)
  c.train.update(seq_len=64, batch_size=64, steps=800, decay_steps=800, lr=3e-3,
                 warmup_steps=50, min_lr=3e-4, log_every=100, eval_every=100, ckpt_every=0,
                 early_stop_accuracy=0.99)
  return c


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


def run_mqar() -> dict[str, float]:
  available = set(registry.names())
  results: dict[str, float] = {}
  for mixer in DEMO_MIXERS:
    if mixer not in available:
      print(f"[demo] skipping {mixer!r}: not registered in this checkout.")
      continue
    print(f"[demo] MQAR with {mixer} ...")
    t0 = time.time()
    summary = loop.train(mqar_demo_config(mixer), _fresh(os.path.join(OUT, f"mqar_{mixer}")))
    results[mixer] = summary["val"]["accuracy"]
    print(f"[demo] {mixer}: accuracy {results[mixer]:.3f} after {summary['step']} steps "
          f"({time.time() - t0:.0f} s)")
  return results


def print_table(results: dict[str, float]) -> None:
  print("\nMQAR (T=64, 4 pairs, V=256, d_model 64, 800 steps on this machine), validation "
        "accuracy over the scored positions.\nA small, equal budget: it shows how fast each "
        "mixer learns recall, not where it ends (README: MQAR on an H100).")
  print(f"{'mixer':<12} accuracy")
  for mixer, acc in results.items():
    print(f"{mixer:<12} {acc:.3f}")


def save_plot(results: dict[str, float]) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(max(3, 1.2 * len(results) + 1), 3))
  ax.bar(list(results), list(results.values()), color="tab:blue")
  ax.set_ylim(0, 1)
  ax.set_ylabel("MQAR accuracy")
  ax.set_title("MQAR T=64, 4 pairs, 800 steps")
  fig.tight_layout()
  path = os.path.join(OUT, "mqar_accuracy.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


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
  results = run_mqar()
  if results:
    print_table(results)
    print(f"[demo] plot saved to {save_plot(results)}")
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
