"""Milliseconds per training step of the shakespeare_char model (nanoGPT's baby GPT).

  python -m experiments.bench.shakespeare_step [--mixer=mha] [--steps=50] [--warmup=10]

Times the jitted train_step (forward, backward, AdamW update; batch 64 x 256 tokens, bf16
compute, float32 params) on random tokens: the median over --steps steps after --warmup
steps, each synchronised with block_until_ready. Prints tokens/s and MFU (formula in
seqmix/train/metrics.py) beside the nanoGPT anchor.

With --nanogpt_dir=<a nanoGPT checkout with data/shakespeare_char/input.txt> the anchor is
measured in the same run: nanoGPT's own train.py with config/train_shakespeare_char.py,
torch.compile, bf16 autocast, --log_interval=1 (so each logged step time includes a sync),
for --nanogpt_iters iterations; its median step time after iteration 50 is reported.
Without it, the recorded anchor (15.7 ms/step on the same H100 kind) is printed.
"""

import os
import re
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

from experiments.configs import shakespeare_char
from seqmix.train import loop
from seqmix.train import metrics as metrics_lib
from seqmix.train import optim
from seqmix.train import state as state_lib
from seqmix.train import step as step_lib

# Recorded anchor: nanoGPT train.py with config/train_shakespeare_char.py, measured on the
# same H100 machine kind with PyTorch 2.11 and torch.compile (not re-measured by this script).
NANOGPT_MS_PER_STEP = 15.7

_MIXER = flags.DEFINE_string("mixer", "mha", "Registry name of the mixer.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed steps first (compilation, autotuning).")
_NANOGPT_DIR = flags.DEFINE_string("nanogpt_dir", None,
                                   "A nanoGPT checkout to time in the same run (optional).")
_NANOGPT_ITERS = flags.DEFINE_integer("nanogpt_iters", 300, "nanoGPT iterations to run.")
_VOCAB = 65  # tinyshakespeare characters


def time_nanogpt(path: str, iters: int) -> float:
  """Median ms per iteration of nanoGPT's train.py (iterations after 50), run in `path`."""
  run = lambda *a: subprocess.run([sys.executable, *a], cwd=path, check=True,
                                  capture_output=True, text=True)
  if not os.path.exists(os.path.join(path, "data", "shakespeare_char", "train.bin")):
    run("data/shakespeare_char/prepare.py")
  out = run("train.py", "config/train_shakespeare_char.py", f"--max_iters={iters}",
            f"--lr_decay_iters={iters}", "--eval_interval=100000", "--eval_iters=1",
            "--log_interval=1", "--out_dir=/tmp/nanogpt_bench").stdout
  times = [float(ms) for it, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out)
           if int(it) > 50]
  if not times:
    raise RuntimeError(f"no step times in nanoGPT's output:\n{out[-2000:]}")
  return statistics.median(times)


def main(argv):
  del argv
  config = shakespeare_char.get_config(f"mixer={_MIXER.value}")
  t = config.train
  model = loop.build_model(config.model, _VOCAB)
  optimizer = optim.make_optimizer(t)
  rng = np.random.default_rng(0)

  def batch():
    x = rng.integers(0, _VOCAB, (t.batch_size, t.seq_len + 1), dtype=np.int32)
    return {"inputs": jax.device_put(x[:, :-1]), "targets": jax.device_put(x[:, 1:])}

  state = state_lib.create_train_state(model, optimizer, jax.random.PRNGKey(0), batch())
  train_step = step_lib.make_train_step(model, optimizer, grad_accum=int(t.grad_accum))
  batches = [batch() for _ in range(4)]
  for i in range(_WARMUP.value):
    state, m = train_step(state, batches[i % 4])
  jax.block_until_ready((state, m))
  times = []
  for i in range(_STEPS.value):
    t0 = time.perf_counter()
    state, m = train_step(state, batches[i % 4])
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  ms = 1e3 * statistics.median(times)
  tokens = t.batch_size * t.seq_len
  tok_s = tokens / (ms / 1e3)
  fpt = metrics_lib.flops_per_token(
      metrics_lib.matmul_param_count(state.params),
      n_attention_layers=metrics_lib.count_attention_layers(config.model),
      d_model=config.model.d_model, seq_len=t.seq_len)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}); mixer {_MIXER.value}; "
        f"{metrics_lib.param_count(state.params):,} params; batch {t.batch_size} x "
        f"{t.seq_len}; compute {config.model.dtype}")
  print(f"seqmix:  {ms:.2f} ms/step (median of {_STEPS.value}), {tok_s:,.0f} tokens/s, "
        f"MFU {metrics_lib.fmt_mfu(metrics_lib.mfu(fpt, tok_s, device))}, "
        f"final loss {float(m['loss']):.3f}")
  if _NANOGPT_DIR.value:
    ng_ms = time_nanogpt(_NANOGPT_DIR.value, _NANOGPT_ITERS.value)
    where = "measured in this run, torch.compile, bf16 autocast"
  else:
    ng_ms = NANOGPT_MS_PER_STEP
    where = "recorded anchor: same H100 kind, PyTorch 2.11 torch.compile"
  print(f"nanoGPT: {ng_ms:.2f} ms/step ({where}), {tokens / (ng_ms / 1e3):,.0f} tokens/s")
  print(f"ratio seqmix/nanoGPT: {ms / ng_ms:.2f}")


if __name__ == "__main__":
  app.run(main)
