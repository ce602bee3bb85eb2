"""Multi-process start-up: when and how to call `jax.distributed.initialize()`.

One JAX process per host (TPU pod slice: one per TPU VM worker; GPUs: one per host driving
all its GPUs, or one per GPU under SLURM / Open MPI). Every process must call
`jax.distributed.initialize()` once, before anything touches a device (`jax.devices()`,
`jax.process_index()`, a computation); afterwards `jax.devices()` lists every device of every
process and a `Mesh` over them spans the hosts.

`train.distributed` picks the behaviour:
  "auto" (default): initialise when the environment says this is one of several processes
    (`multi_process_env`); a single process (a laptop, one multi-GPU host, the tests) does
    not, so nothing changes there.
  "on": always initialise (a TPU pod slice whose VMs do not export TPU_WORKER_HOSTNAMES;
    jax then finds the workers from the TPU metadata server).
  "off": never.
Coordinates not found by jax's own cluster detection (TPU, SLURM, Open MPI, Kubernetes) come
from JAX_COORDINATOR_ADDRESS (read by jax), JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""

import os
from collections.abc import Mapping

import jax

MODES = ("auto", "on", "off")


def _int(env: Mapping[str, str], key: str) -> int:
  try:
    return int(env.get(key, "") or 0)
  except ValueError:
    return 0


def multi_process_env(env: Mapping[str, str]) -> str | None:
  """The launcher that started several processes, by its environment variables, or None.

  Checked: an explicit coordinator (JAX_COORDINATOR_ADDRESS), a Cloud TPU pod slice
  (TPU_WORKER_HOSTNAMES naming more than one worker), SLURM (more than one task in the step)
  and Open MPI (OMPI_COMM_WORLD_SIZE > 1). A single-host TPU VM or a one-task SLURM job is not
  multi-process.
  """
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return f"TPU_WORKER_HOSTNAMES ({len(hosts)} workers)"
  if env.get("SLURM_JOB_ID"):
    n = max(_int(env, "SLURM_STEP_NUM_TASKS"), _int(env, "SLURM_NTASKS"))
    if n > 1:
      return f"SLURM ({n} tasks)"
  if _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return f"Open MPI ({_int(env, 'OMPI_COMM_WORLD_SIZE')} ranks)"
  return None


def should_initialize(mode: str, env: Mapping[str, str]) -> bool:
  """Whether `initialize(mode)` would call `jax.distributed.initialize()` (module docstring)."""
  mode = str(mode).lower()
  if mode not in MODES:
    raise ValueError(f"train.distributed={mode!r}; choose one of {MODES} ('auto' initialises "
                     "only when the launcher started several processes).")
  if mode == "off":
    return False
  return mode == "on" or multi_process_env(env) is not None


def initialize_kwargs(env: Mapping[str, str]) -> dict:
  """num_processes / process_id from JAX_NUM_PROCESSES / JAX_PROCESS_ID, when given."""
  kw = {}
  if env.get("JAX_NUM_PROCESSES"):
    kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if env.get("JAX_PROCESS_ID"):
    kw["process_id"] = int(env["JAX_PROCESS_ID"])
  return kw


def initialize(mode: str = "auto", env: Mapping[str, str] | None = None) -> bool:
  """Call `jax.distributed.initialize()` if `mode` and the environment ask for it (once).

  Returns True when the process is part of an initialised multi-process run. Call it first
  thing in a program (before any device use); calling it again is a no-op.

  Raises:
    RuntimeError: initialisation is wanted but jax's backend already started (a device was
      touched first); the message says to move the call earlier.
  """
  env = os.environ if env is None else env
  if jax.distributed.is_initialized():
    return True
  if not should_initialize(mode, env):
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    raise RuntimeError(
        f"train.distributed={mode!r} wants jax.distributed.initialize() "
        f"({multi_process_env(env) or 'forced'}), but a device was used before it; call "
        "seqmix.parallel.distributed.initialize() before anything else touches jax devices "
        "(experiments.train does so first thing in main).")
  jax.distributed.initialize(**initialize_kwargs(env))
  return True
