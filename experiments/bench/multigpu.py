"""Multi-GPU runs (issue 10): sharded-step correctness, context / sequence parallelism, FSDP × TP.

  python -m experiments.bench.multigpu [--sections=correctness,context,sequence,scaling]
      [--devices=1,2,4,8] [--lengths=32768,131072,524288] [--size=1b] [--remat=full]
  # CPU smoke (tiny shapes, about two minutes):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m experiments.bench.multigpu --smoke

Sections, one Markdown table each (every row in its own try/except: a failing row prints its
error and the rest still run; each section stops starting rows once its --budget_* is spent):

  correctness  on the largest device count: one step of a tiny two-layer mha+gla LM on each
               mesh (dp, fsdp, tp, dp×fsdp×tp, dp×sequence) against the single-device step,
               as tests/parallel/test_sharded_step.py does on simulated devices; float32 with
               matmul precision "highest" (GPU f32 matmuls are otherwise TF32), so the
               relative errors measure only the sharding.
  context      the attention (mha) LM of --size at batch 1, sequence sharded over n devices
               (mesh {sequence: n}), ring vs all-gather context parallelism, each T of
               --lengths walked upwards until one fails; then the largest T each trains.
  sequence     the same walk for a gla LM and a hawk LM (state passing over the sequence axis).
  scaling      FSDP × TP of the --size LM (mesh {fsdp: n/tp, tensor: tp}), weak scaling at
               --per_device_batch sequences of --scaling_seq_len per GPU: tokens/s, MFU
               (seqmix.train.metrics) and scaling efficiency = tokens/s / (n · tokens/s on 1).

Times are the median of --steps train steps (forward + backward + AdamW, state donated) after
--warmup steps, each synchronised. "XLA peak" is the compiled SPMD program's memory estimate
per device (arguments + outputs + temporaries − aliased), read before it runs; a length whose
compile or run fails (RESOURCE_EXHAUSTED: out of memory) ends that walk.

The budgets only stop new rows (a row under way finishes), and default to under the device
tool's 10 minutes a call: run one section per call, e.g. `--sections=context --budget_context=500`.
Every row compiles the whole (unscanned) model, a minute or more for the 1b size.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and the other variables the device notes name,
set below before jax loads NCCL): a program using it can take the host's shared GPUs out of
service. A benchmark, never a test: no thresholds.
"""

import os

# Before jax (and with it NCCL) is imported; forced, not defaulted, so no caller can turn
# NVLink multicast on (device KINDS.md).
for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
  os.environ[_name] = _value

# pylint: disable=g-import-not-at-top,wrong-import-position
import datetime
import gc
import statistics
import time
import traceback

import jax
import numpy as np
import optax
from absl import app
from absl import flags

from experiments.bench._lm125m import lm_config
from seqmix.models import lm
from seqmix.parallel import mesh as mesh_lib
from seqmix.parallel import sharding
from seqmix.train import metrics as metrics_lib
from seqmix.train import optim
from seqmix.train import state as state_lib
from seqmix.train import step as step_lib
from seqmix.train.config import train_defaults

SECTIONS = ("correctness", "context", "sequence", "scaling")

_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS), f"Which of {SECTIONS} to run.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes for a CPU run (flags given still win).")
_DEVICES = flags.DEFINE_list("devices", [], "Device counts (default: 1, the powers of two "
                             "below the number present, and that number).")
_LENGTHS = flags.DEFINE_list("lengths", ["32768", "131072", "524288"],
                             "Sequence lengths of the context / sequence walks, increasing.")
_SIZE = flags.DEFINE_enum("size", "1b", ["tiny", "125m", "1b"], "LM shape (_lm125m.SIZES; "
                          "tiny: d_model 64, 2 layers, vocab 256).")
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots"], "model.remat.")
_HEADS = flags.DEFINE_integer("num_heads", 16, "Heads of the mha / gla / hawk mixers.")
_SEQ_MIXERS = flags.DEFINE_list("seq_mixers", ["gla", "hawk"], "Mixers of the sequence section.")
_TP = flags.DEFINE_list("tp", ["1", "2", "4", "8"], "Tensor-parallel sizes of the scaling "
                        "section (those dividing n are run).")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 4, "Scaling: sequences per GPU.")
_SCALING_SEQ_LEN = flags.DEFINE_integer("scaling_seq_len", 2048, "Scaling: tokens/sequence.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per row.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per row after compiling.")
_RTOL = flags.DEFINE_float("rtol", 1e-5, "Correctness: relative error that passes.")
_BUDGETS = {s: flags.DEFINE_float(f"budget_{s}", b, f"Seconds of the {s} section.")
            for s, b in zip(SECTIONS, (120.0, 420.0, 420.0, 420.0))}

_SMOKE_FLAGS = {"lengths": ["32", "64"], "size": "tiny", "num_heads": 4, "devices": ["1", "4"],
                "tp": ["1", "2"], "per_device_batch": 1, "scaling_seq_len": 64, "steps": 2,
                "warmup": 1, "remat": "none"}


def _apply_smoke():
  for name, value in _SMOKE_FLAGS.items():
    if not flags.FLAGS[name].present:
      flags.FLAGS[name].value = value


def _device_counts() -> list[int]:
  total = len(jax.devices())
  if _DEVICES.value:
    counts = [int(c) for c in _DEVICES.value]
    bad = [c for c in counts if not 1 <= c <= total]
    if bad:
      raise ValueError(f"--devices={','.join(_DEVICES.value)}: {bad} not in [1, {total}] "
                       f"(the devices present); pass counts up to {total}.")
    return counts
  counts = [1 << i for i in range(total.bit_length()) if 1 << i < total]
  return sorted(set(counts + [total]))


def _error(e: Exception) -> str:
  msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
  kind = "out of memory" if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(
      e).lower() else type(e).__name__
  return f"failed: {kind}: {msg}".replace("|", "/")


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class _Budget:
  """Wall-clock budget of one section; `left()` is False once it is spent."""

  def __init__(self, section: str):
    self.seconds = _BUDGETS[section].value
    self._t0 = time.perf_counter()

  def left(self) -> bool:
    return time.perf_counter() - self._t0 < self.seconds


def _free():
  gc.collect()
  jax.clear_caches()


def _model_config(mixer: str, seq_len: int):
  if _SIZE.value == "tiny":
    cfg = lm_config(mixer, "auto", seq_len)
    cfg.update(vocab_size=256, d_model=64, n_layers=2, mlp_ratio=2.0)
  else:
    cfg = lm_config(mixer, "auto", seq_len, _SIZE.value)
  cfg.mixer_kwargs = {mixer: {"num_heads": _HEADS.value}}
  cfg.remat = _REMAT.value
  return cfg


def _random_batch(vocab: int, b: int, t: int) -> dict:
  x = np.random.default_rng(0).integers(0, vocab, (b, t + 1), dtype=np.int32)
  return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def run_sharded(cfg, mesh_cfg: dict, n: int, batch_np: dict, *,
                context_parallel: str = "ring") -> dict:
  """Builds, compiles and times the sharded train step of `cfg` on the first n devices.

  Returns ms (median step), peak (XLA's per-device estimate, bytes), loss, compile_s and
  matmul_params (seqmix.train.metrics.matmul_param_count).
  """
  model = lm.from_config(cfg)
  optimizer = optim.make_optimizer(train_defaults())
  mesh = mesh_lib.make_mesh(mesh_cfg, devices=jax.devices()[:n])
  rules = mesh_lib.logical_rules(mesh_cfg)
  state, sh = sharding.create_sharded_train_state(model, optimizer, jax.random.PRNGKey(0),
                                                  batch_np, mesh, rules)
  n_params = metrics_lib.matmul_param_count(state.params)
  step = sharding.make_sharded_train_step(model, optimizer, mesh, rules, sh,
                                          context_parallel=context_parallel)
  batch = sharding.shard_batch(batch_np, mesh, rules)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes) if mem is not None else float("nan")
  for _ in range(_WARMUP.value):
    state, m = compiled(state, batch)
  jax.block_until_ready((state, m))
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  return {"ms": 1e3 * statistics.median(times), "peak": peak, "loss": float(m["loss"]),
          "compile_s": compile_s, "matmul_params": n_params}


# correctness: the tiny model, optimizer and batch of tests/parallel/test_sharded_step.py.
_C_VOCAB, _C_B, _C_T = 64, 8, 16


def _tiny_model():
  return lm.LanguageModel(vocab_size=_C_VOCAB, d_model=32, n_layers=2, mixer="mha,gla",
                          mlp_ratio=4.0,
                          mixer_kwargs={"mha": {"num_heads": 4}, "gla": {"num_heads": 4}})


def _tiny_optimizer():
  # Clipping (a global reduction across shards) and AdamW with its decay mask, as the loop.
  return optax.chain(optax.clip_by_global_norm(0.5),
                     optax.adamw(1e-2, weight_decay=0.1, mask=optim.decay_mask))


def _tiny_batch():
  rng = np.random.default_rng(0)
  targets = rng.integers(0, _C_VOCAB, (_C_B, _C_T)).astype(np.int32)
  targets[0, :5] = step_lib.IGNORE  # unequal scored-token counts across the batch shards
  return {"inputs": rng.integers(0, _C_VOCAB, (_C_B, _C_T)).astype(np.int32),
          "targets": targets}


def correctness_modes(n: int) -> dict:
  """Mode -> mesh config on n devices (None: needs more devices). 4 heads bound tensor at 4."""
  tp = min(n, 4)
  return {
      "dp": {"data": n},
      "fsdp": {"fsdp": n},
      "tp": {"data": n // tp, "tensor": tp},
      "dp×fsdp×tp": {"data": n // 4, "fsdp": 2, "tensor": 2} if n >= 4 else None,
      # mha runs ring attention, gla state passing; T=16 needs 2·sequence | 16 (zigzag).
      "dp×sequence": ({"data": 2, "sequence": n // 2} if 4 <= n <= 16 else
                      {"sequence": 2} if n == 2 else None),
  }


def _max_rel(a, b) -> float:
  """Largest ‖a−b‖/‖b‖ over the leaves of two trees (inf where a has a NaN)."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if np.isnan(x).any():
      return float("inf")
    denom = np.linalg.norm(y)
    err = np.linalg.norm(x - y) / denom if denom else np.linalg.norm(x - y)
    worst = max(worst, float(err))
  return worst


def section_correctness(counts):
  n = max(counts)
  budget = _Budget("correctness")
  print(f"\n### Sharded step vs single-device step ({n} devices; tiny mha+gla LM, f32, "
        f"matmul precision highest, grad_accum 2, rtol {_RTOL.value:g})\n")
  print("| mode | mesh | loss rel err | grad_norm rel err | params max rel err | "
        "opt_state max rel err | sequence-parallel ops traced | verdict |")
  print("|---|---|---|---|---|---|---|---|")
  model, opt, batch = _tiny_model(), _tiny_optimizer(), _tiny_batch()
  with jax.default_matmul_precision("highest"):
    try:
      state = state_lib.create_train_state(model, opt, jax.random.PRNGKey(1), batch)
      init = jax.device_get(state)  # before the step: it donates `state`
      new, metrics = step_lib.make_train_step(model, opt, grad_accum=2)(state, batch)
      ref, ref_metrics = jax.device_get(new), jax.device_get(metrics)
    except Exception as e:  # pylint: disable=broad-except
      print(f"| single-device reference | - | {_error(e)} |||||||", flush=True)
      traceback.print_exc(limit=3)
      return
    for mode, cfg in correctness_modes(n).items():
      if cfg is None:
        print(f"| {mode} | - | not run: needs more than {n} devices |||||||", flush=True)
        continue
      if not budget.left():
        print(f"| {mode} | {cfg} | not run: section budget spent |||||||", flush=True)
        continue
      try:
        mesh = mesh_lib.make_mesh(cfg, devices=jax.devices()[:n])
        rules = mesh_lib.logical_rules(cfg)
        sh = sharding.state_shardings(model, opt, batch, mesh, rules)
        state = jax.device_put(init, sh.state)
        step = sharding.make_sharded_train_step(model, opt, mesh, rules, sh, grad_accum=2)
        placed = sharding.shard_batch(batch, mesh, rules)
        traced = "-"
        if cfg.get("sequence", 1) > 1:
          traced = "yes" if str(jax.make_jaxpr(step)(state, placed)).count(
              "shard_map") >= 2 else "NO"
        new, metrics = step(state, placed)
        errs = (_max_rel(metrics["loss"], ref_metrics["loss"]),
                _max_rel(metrics["grad_norm"], ref_metrics["grad_norm"]),
                _max_rel(jax.device_get(new.params), ref.params),
                _max_rel(jax.device_get(new.opt_state), ref.opt_state))
        ok = all(e <= _RTOL.value for e in errs) and traced != "NO"
        print(f"| {mode} | {cfg} | " + " | ".join(f"{e:.1e}" for e in errs)
              + f" | {traced} | {'pass' if ok else 'FAIL'} |", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"| {mode} | {cfg} | {_error(e)} |||||||", flush=True)
        traceback.print_exc(limit=3)
      _free()


def _walk(title: str, rows, budget: _Budget):
  """Runs rows = [(mixer, n, method)] over --lengths; prints the step table and the largest T."""
  lengths = [int(t) for t in _LENGTHS.value]
  print(f"\n### {title}\n")
  print(f"{_SIZE.value} LM, batch 1, bf16 compute, f32 params, AdamW, remat {_REMAT.value}, "
        f"{jax.devices()[0].device_kind}; median of {_STEPS.value} steps\n")
  print("| mixer | devices | method | T | tokens/device | step ms (fwd+bwd+AdamW) | tokens/s | "
        "XLA peak/device | loss | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  largest = {}
  for mixer, n, method in rows:
    best, stop = None, "all ran"
    for t in lengths:
      if not budget.left():
        stop = f"{t} not run: section budget spent"
        print(f"| {mixer} | {n} | {method} | {t} | not run: section budget spent |||||||",
              flush=True)
        break
      try:
        cfg = _model_config(mixer, t)
        r = run_sharded(cfg, {"sequence": n}, n, _random_batch(cfg.vocab_size, 1, t),
                        context_parallel=method if method in ("ring", "allgather") else "ring")
        best = t
        print(f"| {mixer} | {n} | {method} | {t} | {t // n} | {r['ms']:.1f} | "
              f"{t / (r['ms'] / 1e3):,.0f} | {_gib(r['peak'])} | {r['loss']:.3f} | "
              f"{r['compile_s']:.0f} |", flush=True)
      except Exception as e:  # pylint: disable=broad-except
        stop = f"{t} {_error(e)}"
        print(f"| {mixer} | {n} | {method} | {t} | {_error(e)} |||||||", flush=True)
        traceback.print_exc(limit=2)
        _free()
        break
      _free()
    largest[(mixer, n, method)] = (best, stop)
  print("\n| mixer | devices | method | largest T that trained | first T that did not |")
  print("|---|---|---|---|---|")
  for (mixer, n, method), (best, stop) in largest.items():
    print(f"| {mixer} | {n} | {method} | {best or 'none'} | {stop} |")


def section_context(counts):
  rows = []
  for n in counts:
    rows += [("mha", 1, "1 device")] if n == 1 else [("mha", n, m) for m in ("ring",
                                                                                 "allgather")]
  _walk("Context parallelism: ring vs all-gather attention (mesh {sequence: n})", rows,
        _Budget("context"))


def section_sequence(counts):
  rows = [(mixer, n, "1 device" if n == 1 else "state passing")
          for mixer in _SEQ_MIXERS.value for n in counts]
  _walk("Sequence-parallel recurrences (mesh {sequence: n})", rows, _Budget("sequence"))


def section_scaling(counts):
  budget = _Budget("scaling")
  t, b = _SCALING_SEQ_LEN.value, _PER_DEVICE_BATCH.value
  device = jax.devices()[0]
  print(f"\n### FSDP × TP scaling ({_SIZE.value} mha LM, {b} × {t} tokens per device, bf16, "
        f"remat {_REMAT.value}, {device.device_kind}; median of {_STEPS.value} steps)\n")
  print("| devices | mesh | global batch | step ms | tokens/s | tokens/s/device | MFU | "
        "scaling efficiency | XLA peak/device | loss |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  base = None
  for n in counts:
    for tp in (int(x) for x in _TP.value):
      if n % tp or (n == 1 and tp != 1):
        continue
      mesh_cfg = {"fsdp": n // tp, "tensor": tp}
      if not budget.left():
        print(f"| {n} | {mesh_cfg} | not run: section budget spent |||||||||", flush=True)
        continue
      try:
        cfg = _model_config("mha", t)
        r = run_sharded(cfg, mesh_cfg, n, _random_batch(cfg.vocab_size, b * n, t))
        tok_s = b * n * t / (r["ms"] / 1e3)
        if n == 1:
          base = tok_s
        flops = metrics_lib.flops_per_token(
            r["matmul_params"], n_attention_layers=metrics_lib.count_attention_layers(cfg),
            d_model=cfg.d_model, seq_len=t)
        mfu = metrics_lib.fmt_mfu(metrics_lib.mfu(flops, tok_s / n, device))
        eff = f"{100 * tok_s / (n * base):.0f}%" if base else "n/a (no 1-device row)"
        print(f"| {n} | {mesh_cfg} | {b * n} | {r['ms']:.1f} | {tok_s:,.0f} | "
              f"{tok_s / n:,.0f} | {mfu} | {eff} | {_gib(r['peak'])} | {r['loss']:.3f} |",
              flush=True)
      except Exception as e:  # pylint: disable=broad-except
        print(f"| {n} | {mesh_cfg} | {_error(e)} |||||||||", flush=True)
        traceback.print_exc(limit=2)
      _free()


def main(argv):
  del argv
  if _SMOKE.value:
    _apply_smoke()
  unknown = set(_SECTIONS.value) - set(SECTIONS)
  if unknown:
    raise app.UsageError(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}.")
  counts = _device_counts()
  devices = jax.devices()
  print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{len(devices)} × {devices[0].device_kind} ({devices[0].platform}); jax "
        f"{jax.__version__}; device counts {counts}; NCCL_NVLS_ENABLE="
        f"{os.environ['NCCL_NVLS_ENABLE']}{'; smoke' if _SMOKE.value else ''}")
  for name, fn in (("correctness", section_correctness), ("context", section_context),
                   ("sequence", section_sequence), ("scaling", section_scaling)):
    if name in _SECTIONS.value:
      fn(counts)


if __name__ == "__main__":
  app.run(main)
