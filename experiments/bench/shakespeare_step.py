"""Milliseconds per training step of the shakespeare_char model (nanoGPT's baby GPT).

  python -m experiments.bench.shakespeare_step [--mixer=mha] [--steps=50] [--warmup=10]

Times the jitted train_step (forward, backward, AdamW update; batch 64 x 256 tokens, bf16
compute, float32 params) on random tokens: the median over --steps steps after --warmup
steps, each synchronised with block_until_ready. Prints tokens/s and MFU (formula in
seqmix/train/metrics.py) beside the recorded nanoGPT anchor.
"""

import statistics
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
_VOCAB = 65  # tinyshakespeare characters


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
  print(f"nanoGPT: {NANOGPT_MS_PER_STEP:.1f} ms/step (recorded anchor: same H100 kind, "
        f"PyTorch 2.11 torch.compile), {tokens / (NANOGPT_MS_PER_STEP / 1e3):,.0f} tokens/s")


if __name__ == "__main__":
  app.run(main)
