"""Train a language model from an ml-collections config.

  python -m experiments.train \
      --config experiments/configs/shakespeare_char.py:mixer=mha \
      --config.train.steps=2000 --workdir runs/sc_mha

Rerunning with the same --workdir resumes from its newest checkpoint, onto the mesh the
config asks for now (`--config.train.mesh.fsdp=8` then `--config.train.mesh.data=2
--config.train.mesh.fsdp=4` is fine). The config is validated before anything compiles;
errors name the field and what to change.

Several hosts: start this same command on every host (one process per host);
`train.distributed` ("auto": when the launcher says there are several processes; "on" on a
TPU pod slice) calls `jax.distributed.initialize()` first, each process reads its own rows
of every batch, and --workdir must be a directory all hosts share (e.g. gs:// or NFS).
"""

import sys

from absl import app
from absl import logging as absl_logging
from absl import flags
from ml_collections import config_flags

from seqmix.parallel import distributed
from seqmix.train import loop
from seqmix.train.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (experiments/configs/<study>.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard.")


def run(config, workdir: str) -> dict:
  """The CLI's body, callable in-process (tests)."""
  return loop.train(config, workdir)


def main(argv):
  # Orbax and grain log every save at INFO; keep the console to progress and metrics.
  absl_logging.set_verbosity(absl_logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("Give --config=experiments/configs/<study>.py[:arg] and --workdir.")
  try:
    # First, before anything touches a device (loop.train calls it again: a no-op then).
    distributed.initialize(_CONFIG.value.train.get("distributed", "auto"))
    summary = run(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    print(f"Config error: {e}", file=sys.stderr)
    sys.exit(2)
  val = summary["val"]
  print(f"done: step {summary['step']}, val loss {val['loss']:.4f} "
        f"({val['bits_per_token']:.4f} bits/token), val accuracy {val['accuracy']:.4f}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
