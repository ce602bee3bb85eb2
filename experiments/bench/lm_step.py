"""Milliseconds per training step of a GPT-2-small-sized (≈125M-parameter) language model.

  python -m experiments.bench.lm_step [--mixers=gla,gated_deltanet] [--impls=chunked,pallas]
      [--seq_len=2048] [--batch_size=8] [--steps=20]

For each mixer and each op impl (passed as the mixer's `impl` keyword; "auto" leaves the
mixer's default), builds the model of `lm_config` (12 layers, d_model 768, vocab 50304, RMSNorm,
SwiGLU MLP ×8/3, bf16 compute, float32 params, AdamW) and times the jitted train step on random
tokens: the median of --steps steps after 3 warm-up steps, each synchronised with
block_until_ready. Prints one row per (mixer, impl): params, ms/step, tokens/s, and the error
of a row that fails to build, compile or run (the other rows still run).

This is a benchmark (issue 8's "125M gla and gated_deltanet train step, before/after"), never a
test: there are no thresholds here.
"""

import statistics
import time
import traceback

import jax
import numpy as np
from absl import app
from absl import flags

from experiments.bench._lm125m import VOCAB as _VOCAB
from experiments.bench._lm125m import lm_config
from seqmix.models import lm
from seqmix.train import metrics as metrics_lib
from seqmix.train import optim
from seqmix.train import state as state_lib
from seqmix.train import step as step_lib
from seqmix.train.config import train_defaults

_MIXERS = flags.DEFINE_list("mixers", ["gla", "gated_deltanet"], "Registry names.")
_IMPLS = flags.DEFINE_list("impls", ["chunked", "pallas"], "Op impls to pass as `impl`.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")


def time_row(mixer: str, impl: str) -> str:
  t = train_defaults()
  model = lm.from_config(lm_config(mixer, impl, _SEQ_LEN.value))
  optimizer = optim.make_optimizer(t)
  rng = np.random.default_rng(0)

  def batch():
    x = rng.integers(0, _VOCAB, (_BATCH.value, _SEQ_LEN.value + 1), dtype=np.int32)
    return {"inputs": jax.device_put(x[:, :-1]), "targets": jax.device_put(x[:, 1:])}

  batches = [batch() for _ in range(2)]
  state = state_lib.create_train_state(model, optimizer, jax.random.PRNGKey(0), batches[0])
  train_step = step_lib.make_train_step(model, optimizer)
  t0 = time.perf_counter()
  for i in range(3):
    state, m = train_step(state, batches[i % 2])
  jax.block_until_ready((state, m))
  warm_s = time.perf_counter() - t0
  times = []
  for i in range(_STEPS.value):
    t0 = time.perf_counter()
    state, m = train_step(state, batches[i % 2])
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  ms = 1e3 * statistics.median(times)
  tok_s = _BATCH.value * _SEQ_LEN.value / (ms / 1e3)
  n = metrics_lib.param_count(state.params)
  return (f"| {mixer} | {impl} | {n / 1e6:.1f} M | {ms:.1f} | {tok_s:,.0f} | "
          f"{float(m['loss']):.3f} | {warm_s:.0f} s |")


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}); batch {_BATCH.value} x "
        f"{_SEQ_LEN.value}; bf16 compute, f32 params; median of {_STEPS.value} steps")
  print("| mixer | impl | params | ms/step | tokens/s | loss | compile + 3 steps |")
  print("|---|---|---|---|---|---|---|")
  for mixer in _MIXERS.value:
    for impl in _IMPLS.value:
      try:
        print(time_row(mixer, impl), flush=True)
      except Exception as e:  # pylint: disable=broad-except
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        print(f"| {mixer} | {impl} | failed: {type(e).__name__}: {msg} |||||", flush=True)
        traceback.print_exc(limit=2)


if __name__ == "__main__":
  app.run(main)
