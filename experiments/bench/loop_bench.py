"""Where the training loop's time goes: the jitted step alone vs `seqmix.train.loop.train`.

    python -m experiments.bench.loop_bench [--config_arg=mixer=mha] [--steps=300]
        [--profile_dir=DIR]

Issue 16: on the H200 the baby GPT's jitted step takes 12-13.5 ms but `loop.train` ran at
37-41 ms per step. This script bisects the difference on the shakespeare_char model and data,
adding one piece of the loop at a time (ms per step: wall clock over the steps after the first
50, mean, so periodic host syncs count; the median interval between updates beside it):
  step                  the jitted step on 4 pre-made device batches, dispatched async
  step (sync each)      the same, blocking on every step (median; shakespeare_step's way)
  step+sched+acc        the step jitted with the lr schedule (metrics["lr"]) and the loop's
                        per-step `_accumulate` of the metrics on the device
  step+prefetch(host)   the step fed by `loop.prefetch_to_device` over 4 host numpy batches
                        (the device_put thread without grain)
  step+prefetch(grain)  the same over the grain iterator
  step+sched+acc+grain  both: the loop's per-step work without its log points
  data (host, per batch) the grain pipeline alone
  loop                  `loop.train`, evaluation / checkpoints / TensorBoard / bar off
  loop (log 1000)       the same logging every 1000 steps instead of 10
  loop+tb+bar           TensorBoard and the tqdm bar on
  loop (GIL 0.2 ms)     `loop` with sys.setswitchinterval(2e-4) instead of Python's 5 ms
The table ends with each row's ratio to `step` (issue 16's target: loop within 10 %).
--profile_dir=DIR: a jax.profiler (Perfetto) trace of 40 steps of `step` and of `loop`, in
DIR/step and DIR/loop (steps 50-90, left out of their rows' times), each summarised per trace line (device streams and host threads: events
and busy ms per step, `_trace_summary`).
"""

import itertools
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

from experiments.bench import _trace_summary
from experiments.configs import shakespeare_char
from seqmix.train import loop
from seqmix.train import optim
from seqmix.train import state as state_lib
from seqmix.train import step as step_lib

_ARG = flags.DEFINE_string("config_arg", "mixer=mha",
                           "shakespeare_char.get_config argument ('mixer=mha,smoke' on a CPU).")
_STEPS = flags.DEFINE_integer("steps", 300, "Steps per variant (the first 50 are not timed).")
_PROFILE = flags.DEFINE_string("profile_dir", None, "Write jax.profiler traces here.")
_SKIP = 50
_TRACED = 40


def _config(**train_overrides):
  config = shakespeare_char.get_config(_ARG.value)
  t = config.train
  t.steps = _STEPS.value
  t.eval_every, t.ckpt_every, t.tensorboard, t.progress = 0, 0, False, False
  t.sample_tokens = 0
  for k, v in train_overrides.items():
    setattr(t, k, v)
  return config


class _Tracer:
  """Starts a profiler trace at step _SKIP and stops it _TRACED steps later (if asked)."""

  def __init__(self, name: str | None):
    self.dir = os.path.join(_PROFILE.value, name) if (_PROFILE.value and name) else None
    self.on = False

  def __call__(self, i: int, sync=None):
    if self.dir is None:
      return
    if i == _SKIP:
      jax.block_until_ready(sync)
      jax.profiler.start_trace(self.dir, create_perfetto_trace=True)
      self.on = True
    elif i == _SKIP + _TRACED and self.on:
      jax.block_until_ready(sync)
      jax.profiler.stop_trace()
      self.on = False
      print(_trace_summary.summarize(self.dir, _TRACED), flush=True)


def _stats(stamps, traced: bool = False) -> tuple[float, float]:
  """(mean, median) ms between updates after the first _SKIP (and after the traced ones)."""
  dts = np.diff(stamps[_SKIP + (_TRACED + 1 if traced else 0):])
  return 1e3 * float(np.mean(dts)), 1e3 * float(statistics.median(dts))


def time_step(config, data, *, schedule=False, accumulate=False, feed="device", sync=False,
              trace=None) -> tuple[float, float]:
  """The jitted step alone, with the loop's pieces added one at a time (see the docstring)."""
  t = config.train
  model = loop.build_model(config.model, data.vocab_size)
  optimizer = optim.make_optimizer(t)
  sched = optim.lr_schedule(peak_lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                            decay_steps=t.decay_steps) if schedule else None
  it = iter(data.train)
  host = [next(it) for _ in range(4)]
  if feed == "device":
    device_batches = [loop._to_device(b) for b in host]  # pylint: disable=protected-access
    batches = (device_batches[i % 4] for i in itertools.count())
  elif feed == "host":
    batches = (b for b, _ in loop.prefetch_to_device(itertools.cycle(host)))
  else:
    batches = (b for b, _ in loop.prefetch_to_device(data.train))
  first = next(batches)
  state = state_lib.create_train_state(model, optimizer, jax.random.PRNGKey(0), first)
  train_step = step_lib.make_train_step(model, optimizer, grad_accum=int(t.grad_accum),
                                        schedule=sched)
  acc = loop._zero_accumulator()()  # pylint: disable=protected-access
  tracer = _Tracer(trace)
  stamps = []
  for i in range(_STEPS.value):
    tracer(i, state)
    state, m = train_step(state, first if i == 0 else next(batches))
    if accumulate:
      acc = loop._accumulate(acc, m)  # pylint: disable=protected-access
    if sync or i == _STEPS.value - 1:
      jax.block_until_ready((state, m))
    stamps.append(time.perf_counter())
  mean, med = _stats(stamps, tracer.dir is not None)
  return (med if sync else mean), med


def time_data_only(data) -> float:
  it = iter(data.train)
  for _ in range(10):
    next(it)
  t0 = time.perf_counter()
  for _ in range(100):
    next(it)
  return 1e3 * (time.perf_counter() - t0) / 100


def time_loop(config, trace=None) -> tuple[float, float]:
  """(mean, median) ms per step of loop.train over the steps after the first _SKIP."""
  stamps = []
  tracer = _Tracer(trace)

  def hook(step, metrics):
    if step == config.train.steps - 1:
      jax.block_until_ready(metrics)
    tracer(step, metrics)
    stamps.append(time.perf_counter())

  with tempfile.TemporaryDirectory() as workdir:
    loop.train(config, workdir, hooks=[hook])
  return _stats(stamps, tracer.dir is not None)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  os.environ.setdefault("SEQMIX_DATA_DIR", os.path.join(os.getcwd(), "shared", "data"))
  device = jax.devices()[0]
  print(f"device {device.device_kind}; config {_ARG.value}; {_STEPS.value} steps per variant "
        f"(first {_SKIP} untimed)", flush=True)
  data = lambda: loop.make_data(_config())  # a fresh iterator per variant
  rows = []

  def add(name, mean, med):
    rows.append((name, mean, med))
    print(f"  {name}: mean {mean:.2f} ms/step, median {med:.2f}", flush=True)

  add("step", *time_step(_config(), data(), trace="step"))
  add("step (sync each)", *time_step(_config(), data(), sync=True))
  add("step+sched+acc", *time_step(_config(), data(), schedule=True, accumulate=True))
  add("step+prefetch(host)", *time_step(_config(), data(), feed="host"))
  add("step+prefetch(grain)", *time_step(_config(), data(), feed="grain"))
  add("step+sched+acc+grain", *time_step(_config(), data(), schedule=True, accumulate=True,
                                         feed="grain"))
  d = time_data_only(data())
  add("data (host, per batch)", d, d)
  default_interval = sys.getswitchinterval()
  for name, over, interval in (
      ("loop", {}, default_interval),
      ("loop (log 1000)", {"log_every": 1000}, default_interval),
      ("loop+tb+bar", {"tensorboard": True, "progress": True}, default_interval),
      ("loop (GIL 0.2 ms)", {}, 2e-4)):
    sys.setswitchinterval(interval)
    try:
      add(name, *time_loop(_config(**over), trace="loop" if name == "loop" else None))
    finally:
      sys.setswitchinterval(default_interval)
  step_ms = rows[0][1]
  print(f"\n{'variant':<24} {'ms/step (mean)':>15} {'median':>8} {'/ step':>7}")
  for name, mean, med in rows:
    ratio = "" if name.startswith("data") else f"{mean / step_ms:7.2f}"
    print(f"{name:<24} {mean:>15.2f} {med:8.2f} {ratio}")
  loop_ms = rows[[r[0] for r in rows].index("loop")][1]
  print(f"\nstep-only {step_ms:.2f} ms/step, loop {loop_ms:.2f} ms/step, "
        f"ratio {loop_ms / step_ms:.2f} (target <= 1.10)")


if __name__ == "__main__":
  app.run(main)
