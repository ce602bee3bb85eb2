"""Timing and memory helpers shared by the benchmarks (device-synchronised medians)."""

import statistics
import time

import jax

HBM_BYTES_PER_S = {"H100": 3.0e12, "H200": 4.3e12}  # measured copies (device README)


def bandwidth(device=None) -> float:
  kind = (device or jax.devices()[0]).device_kind
  for name, bw in HBM_BYTES_PER_S.items():
    if name in kind:
      return bw
  return float("nan")


def median_ms(fn, *args, warmup: int = 3, reps: int = 10) -> float:
  """Median wall time of fn(*args) in ms, each call synchronised with block_until_ready."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def peak_bytes(jitted, *args) -> int:
  """XLA's compiled memory estimate: arguments + outputs + temporaries (aliasing removed)."""
  m = jitted.lower(*args).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
