"""Where the training loop's time goes: the jitted step alone vs `seqmix.train.loop.train`.

    python -m experiments.bench.loop_bench [--config_arg=mixer=mha] [--steps=300]

Issue 16: on the H200 the baby GPT's jitted step takes 13.5 ms but `experiments.train` ran at
37-53 ms per step. This script times, on the shakespeare_char model and data, one variant at a
time (ms per step, mean over the steps after the first 50, wall clock, so periodic host syncs
count):
  step        the jitted step on 4 pre-made device batches (no host work at all)
  data        the grain pipeline alone (host ms per batch, no device)
  step+data   the jitted step fed by `loop.prefetch_to_device(grain iterator)`
  loop        `loop.train` with evaluation, checkpoints, TensorBoard and the progress bar off
  loop+tb+bar the same with TensorBoard and the tqdm bar on
  loop+eval+ckpt  the same with evaluation and (async) checkpoints every 100 steps
  loop (GIL 0.2 ms)  `loop` with sys.setswitchinterval(2e-4) instead of Python's 5 ms: the
              data threads (grain's and the prefetcher) hold the GIL while the main thread
              waits to dispatch; a shorter interval bounds that wait
The per-step time of a `loop` variant comes from a hook that records the host clock after
every update; the last step is synchronised before the clock stops. The table ends with each
loop variant's ratio to `step` (issue 16's target: the loop within 10 %, ratio <= 1.10).
--profile_dir=DIR writes a jax.profiler trace of the `loop` variant (TensorBoard / Perfetto).
"""

import contextlib
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging as absl_logging

from experiments.configs import shakespeare_char
from seqmix.train import loop
from seqmix.train import optim
from seqmix.train import state as state_lib
from seqmix.train import step as step_lib

_ARG = flags.DEFINE_string("config_arg", "mixer=mha",
                           "shakespeare_char.get_config argument ('mixer=mha,smoke' on a CPU).")
_STEPS = flags.DEFINE_integer("steps", 300, "Steps per variant (the first 50 are not timed).")
_PROFILE = flags.DEFINE_string("profile_dir", None, "Write a jax.profiler trace of `loop` here.")
_SKIP = 50


def _config(**train_overrides):
  config = shakespeare_char.get_config(_ARG.value)
  t = config.train
  t.steps = _STEPS.value
  t.eval_every, t.ckpt_every, t.tensorboard, t.progress = 0, 0, False, False
  t.sample_tokens = 0
  for k, v in train_overrides.items():
    setattr(t, k, v)
  return config


def time_step_only(config, data) -> float:
  t = config.train
  model = loop.build_model(config.model, data.vocab_size)
  optimizer = optim.make_optimizer(t)
  it = iter(data.train)
  batches = [loop._to_device(next(it)) for _ in range(4)]  # pylint: disable=protected-access
  state = state_lib.create_train_state(model, optimizer, jax.random.PRNGKey(0), batches[0])
  train_step = step_lib.make_train_step(model, optimizer, grad_accum=int(t.grad_accum))
  for i in range(_SKIP):
    state, m = train_step(state, batches[i % 4])
  jax.block_until_ready(m)
  n = _STEPS.value - _SKIP
  t0 = time.perf_counter()
  for i in range(n):
    state, m = train_step(state, batches[i % 4])
  jax.block_until_ready(m)
  return 1e3 * (time.perf_counter() - t0) / n


def time_data_only(data) -> float:
  it = iter(data.train)
  for _ in range(10):
    next(it)
  t0 = time.perf_counter()
  for _ in range(100):
    next(it)
  return 1e3 * (time.perf_counter() - t0) / 100


def time_step_with_data(config, data) -> float:
  t = config.train
  model = loop.build_model(config.model, data.vocab_size)
  optimizer = optim.make_optimizer(t)
  batches = loop.prefetch_to_device(data.train)
  batch, _ = next(batches)
  state = state_lib.create_train_state(model, optimizer, jax.random.PRNGKey(0), batch)
  train_step = step_lib.make_train_step(model, optimizer, grad_accum=int(t.grad_accum))
  for _ in range(_SKIP):
    state, m = train_step(state, next(batches)[0])
  jax.block_until_ready(m)
  n = _STEPS.value - _SKIP
  t0 = time.perf_counter()
  for _ in range(n):
    state, m = train_step(state, next(batches)[0])
  jax.block_until_ready(m)
  return 1e3 * (time.perf_counter() - t0) / n


def time_loop(config) -> tuple[float, float]:
  """(mean, median) ms per step of loop.train over the steps after the first _SKIP."""
  stamps = []

  def hook(step, metrics):
    if step == config.train.steps - 1:
      jax.block_until_ready(metrics)
    stamps.append(time.perf_counter())

  with tempfile.TemporaryDirectory() as workdir:
    loop.train(config, workdir, hooks=[hook])
  dts = np.diff(stamps[_SKIP:])
  return 1e3 * float(np.mean(dts)), 1e3 * float(statistics.median(dts))


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  os.environ.setdefault("SEQMIX_DATA_DIR", os.path.join(os.getcwd(), "shared", "data"))
  device = jax.devices()[0]
  print(f"device {device.device_kind}; config {_ARG.value}; {_STEPS.value} steps per variant "
        f"(first {_SKIP} untimed)", flush=True)
  rows = []
  data = loop.make_data(_config())
  step_ms = time_step_only(_config(), data)
  rows.append(("step", step_ms, None))
  rows.append(("data (host, per batch)", time_data_only(loop.make_data(_config())), None))
  rows.append(("step+data", time_step_with_data(_config(), loop.make_data(_config())), None))
  print(f"  step: {step_ms:.2f} ms/step", flush=True)
  default_interval = sys.getswitchinterval()
  for name, over, interval in (
      ("loop", {}, default_interval),
      ("loop+tb+bar", {"tensorboard": True, "progress": True}, default_interval),
      ("loop+eval+ckpt", {"eval_every": 100, "ckpt_every": 100}, default_interval),
      ("loop (GIL 0.2 ms)", {}, 2e-4)):
    trace = (jax.profiler.trace(_PROFILE.value) if _PROFILE.value and name == "loop"
             else contextlib.nullcontext())
    sys.setswitchinterval(interval)
    try:
      with trace:
        mean, med = time_loop(_config(**over))
    finally:
      sys.setswitchinterval(default_interval)
    rows.append((name, mean, med))
    print(f"  {name}: mean {mean:.2f} ms/step, median {med:.2f}", flush=True)
  print(f"\n{'variant':<24} {'ms/step (mean)':>15} {'median':>8} {'/ step':>7}")
  for name, mean, med in rows:
    ratio = f"{mean / step_ms:7.2f}" if name.startswith("loop") else ""
    print(f"{name:<24} {mean:>15.2f} {'' if med is None else f'{med:8.2f}':>8} {ratio}")
  loop_ms = rows[[r[0] for r in rows].index("loop")][1]
  print(f"\nstep-only {step_ms:.2f} ms/step, loop {loop_ms:.2f} ms/step, "
        f"ratio {loop_ms / step_ms:.2f} (target <= 1.10)")


if __name__ == "__main__":
  app.run(main)
