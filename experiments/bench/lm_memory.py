"""The longest sequence at which a 125M-parameter LM trains one step, per mixer and remat.

  python -m experiments.bench.lm_memory [--mixers=mha,gla,mamba2] [--remats=none,full]
      [--lengths=4096,16384,65536,262144] [--budget_s=100]

For each (mixer, remat), walks --lengths upwards at batch 1 with `lm_config` (12
layers, d_model 768, bf16 compute, float32 params, AdamW): compiles the train step, reads
XLA's memory estimate (arguments + outputs + temporaries), then runs the step once and
synchronises. A length whose compile or run raises RESOURCE_EXHAUSTED (out of memory) ends the
walk; the table prints the longest length that ran, its estimate and the first that did not.
A length whose estimate exceeds the device's memory limit (or --limit_gib) counts as out of
memory without running. After the first failure the walk bisects between the last length that
ran and the first that did not (--bisect_steps times, in multiples of --granule), so the table
brackets the longest length. Lengths are tried only while the (mixer, remat) pair has time
left of --budget_s, so one slow compile cannot eat the run.

A benchmark (issue 16's memory table), never a test.
"""

import time

import jax
import numpy as np
from absl import app
from absl import flags

from experiments.bench._lm125m import lm_config
from seqmix.models import lm
from seqmix.train import optim
from seqmix.train import state as state_lib
from seqmix.train import step as step_lib
from seqmix.train.config import train_defaults

_MIXERS = flags.DEFINE_list("mixers", ["mha", "gla", "mamba2"], "Registry names.")
_REMATS = flags.DEFINE_list("remats", ["none", "full"], "model.remat values.")
_LENGTHS = flags.DEFINE_list("lengths", ["4096", "16384", "65536", "262144"],
                             "Sequence lengths to try, increasing.")
_BUDGET = flags.DEFINE_float("budget_s", 100.0, "Seconds per (mixer, remat) walk.")
_BISECT = flags.DEFINE_integer("bisect_steps", 3, "Bisection steps after the first failure.")
_GRANULE = flags.DEFINE_integer("granule", 4096, "Bisected lengths are multiples of this.")
_LIMIT = flags.DEFINE_float("limit_gib", None, "Memory limit for the estimate check; default: "
                            "the device's bytes_limit (none on CPU: every length runs).")


class _StopWalk(Exception):
  """Ends a (mixer, remat) walk: args[0] is the length left untried for lack of time, or None
  after an error that is not out of memory (recorded in the table)."""


class EstimateTooLarge(Exception):
  """XLA's estimate exceeds the memory limit: counted as out of memory, not run."""


def _oom(e: Exception) -> bool:
  return (isinstance(e, EstimateTooLarge) or "RESOURCE_EXHAUSTED" in str(e)
          or "out of memory" in str(e).lower())


def memory_limit() -> int | None:
  """Bytes the estimate may reach: --limit_gib, else the device's bytes_limit, else None."""
  if _LIMIT.value is not None:
    return int(_LIMIT.value * 2**30)
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def try_length(mixer: str, remat: str, seq_len: int, limit: int | None) -> int:
  """Runs one train step at batch 1; returns XLA's memory estimate in bytes.

  Raises EstimateTooLarge, before running, when the estimate exceeds `limit` bytes.
  """
  cfg = lm_config(mixer, "auto", seq_len)
  cfg.remat = remat
  model = lm.from_config(cfg)
  optimizer = optim.make_optimizer(train_defaults())
  x = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, seq_len + 1), dtype=np.int32)
  batch = {"inputs": jax.device_put(x[:, :-1]), "targets": jax.device_put(x[:, 1:])}
  state = state_lib.create_train_state(model, optimizer, jax.random.PRNGKey(0), batch)
  train_step = step_lib.make_train_step(model, optimizer)  # jitted, state donated
  compiled = train_step.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  est = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
  if limit is not None and est > limit:
    raise EstimateTooLarge(f"estimate {est / 2**30:.1f} GiB > limit {limit / 2**30:.1f} GiB")
  jax.block_until_ready(compiled(state, batch))
  return est


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}); batch 1; 125M LM; bf16 compute")
  print("| mixer | remat | longest T that ran | XLA estimate there | first T that did not |")
  print("|---|---|---|---|---|")
  limit = memory_limit()
  for mixer in _MIXERS.value:
    for remat in _REMATS.value:
      t0 = time.perf_counter()
      best, best_est, failed, failed_t = None, None, "not reached", None

      def attempt(t):
        """True if length t ran; records the best length and the first failure."""
        nonlocal best, best_est, failed, failed_t
        if time.perf_counter() - t0 > _BUDGET.value:
          raise _StopWalk(t)
        try:
          best_est, best = try_length(mixer, remat, t, limit), t
          return True
        except Exception as e:  # pylint: disable=broad-except
          failed_t = t
          failed = f"{t} (out of memory)" if _oom(e) else (
              f"{t} ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})")
          if not _oom(e):
            raise _StopWalk(None) from e
          return False

      try:
        for t in (int(s) for s in _LENGTHS.value):
          if not attempt(t):
            break
        lo = best or 0
        bisect = best is not None and failed_t is not None and "memory" in failed
        for _ in range(_BISECT.value if bisect else 0):
          mid = (lo + failed_t) // 2 // _GRANULE.value * _GRANULE.value
          if mid <= lo:
            break
          if attempt(mid):
            lo = mid
          else:
            failed_t = mid
      except _StopWalk as e:
        if e.args[0] is not None and failed_t is None:  # out of time before any failure
          failed = f"not tried (time budget; next was {e.args[0]})"
      est = f"{best_est / 2**30:.1f} GiB" if best_est is not None else "-"
      print(f"| {mixer} | {remat} | {best or 'none'} | {est} | {failed} |", flush=True)


if __name__ == "__main__":
  app.run(main)
