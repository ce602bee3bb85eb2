"""`train(config, workdir)`: the whole run — data, model, jitted steps, progress, periodic
evaluation over the whole validation split, checkpoints, resume, and a sample at the end.

A run restarted with the same workdir resumes from the newest checkpoint (params,
optimizer state, step, rng and the data iterator's position), so it continues exactly as
the uninterrupted run would have.
"""

import functools
import math
import os
import queue
import threading
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from seqmix.parallel import axes
from seqmix.parallel import distributed
from seqmix.parallel import mesh as mesh_lib
from seqmix.parallel import sharding as sharding_lib
from seqmix.train import checkpoint as ckpt_lib
from seqmix.train import config as config_lib
from seqmix.train import metrics as metrics_lib
from seqmix.train import optim
from seqmix.train import state as state_lib
from seqmix.train import step as step_lib

Hook = Callable[[int, dict], None]


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss (or parameters); `step` is the update that did."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


class DataSplits:
  """What `seqmix.data.pipeline.make_datasets` provides, under fixed names.

  train: an iterator of batches with get_state()/set_state(); validation(): a fresh
  iterable over the whole validation split; vocab_size: int; decode: token ids -> str
  (None for synthetic tasks).
  """

  def __init__(self, train, validation, vocab_size, decode=None):
    self.train = train
    self.validation = validation
    self.vocab_size = int(vocab_size)
    self.decode = decode

  @classmethod
  def wrap(cls, ds: Any) -> "DataSplits":
    if isinstance(ds, DataSplits):
      return ds
    if isinstance(ds, tuple) and not hasattr(ds, "_fields"):
      return cls(*ds)
    get = ds.get if isinstance(ds, dict) else (lambda k, d=None: getattr(ds, k, d))
    val = get("validation") or get("val") or get("eval")
    return cls(get("train"), val, get("vocab_size"), get("decode"))

  def validation_batches(self) -> Iterable[dict]:
    return self.validation() if callable(self.validation) else self.validation


def make_data(config: ml_collections.ConfigDict) -> DataSplits:
  from seqmix.data import pipeline  # pylint: disable=g-import-not-at-top
  t = config.train
  return DataSplits.wrap(pipeline.make_datasets(config.data, seq_len=int(t.seq_len),
                                                batch_size=int(t.batch_size),
                                                seed=int(config.seed)))


def build_model(model_cfg: ml_collections.ConfigDict, vocab_size: int):
  """The LanguageModel of `model_cfg`, its vocab taken from the data when `vocab_size <= 0`."""
  from seqmix.models import lm  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  if int(cfg.get("vocab_size", 0) or 0) <= 0:
    cfg.vocab_size = vocab_size
  elif cfg.vocab_size < vocab_size:
    raise config_lib.ConfigError(
        f"model.vocab_size={cfg.vocab_size} is smaller than the data's vocabulary "
        f"({vocab_size}); set model.vocab_size=0 to take it from the data.")
  return lm.from_config(cfg)


def _to_device(batch: dict, sharding=None) -> dict:
  """Host batch -> device arrays, one plain transfer each. Dtypes are narrowed on the host
  (int64 -> int32 unless x64 is on): `jnp.asarray` would dispatch a conversion op per array,
  which cost ~14 ms per batch in the loop (profiled on CPU, 2026-11-24)."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.device_put(v.astype(jax.dtypes.canonicalize_dtype(v.dtype), copy=False),
                            sharding)
  return out


def prefetch_to_device(iterator, size: int = 2, sharding=None, put=None):
  """Yield `iterator`'s batches on the device, `size` batches ahead, from a host thread.

  Overlaps grain's host work and the host->device copy with the running step. The
  iterator is only ever advanced by the thread, so its saved state counts the batches
  fetched ahead: checkpoints store the state of the last batch *consumed* instead (the
  thread records it beside each batch). `put`: host batch -> device batch (default
  `_to_device` with `sharding`: where to put each [B, T] array, None: the default device;
  the loop passes `sharding.global_batch` on a mesh, which also assembles multi-process
  batches).
  """
  put = put or functools.partial(_to_device, sharding=sharding)
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()

  def worker():
    try:
      for batch in iterator:
        state = iterator.get_state() if hasattr(iterator, "get_state") else None
        q.put((put(batch), state))
    except Exception as e:  # pylint: disable=broad-except
      q.put((e, None))
    q.put((sentinel, None))

  threading.Thread(target=worker, daemon=True).start()
  while True:
    item, state = q.get()
    if item is sentinel:
      return
    if isinstance(item, Exception):
      raise item
    yield item, state


class _Window(NamedTuple):
  """Steps [start, end) whose metrics `acc` (`_accumulate`'s sums, on the device) holds."""
  acc: dict
  start: int
  end: int


def _zero_accumulator(sharding=None):
  """A function returning fresh device sums for `_accumulate` (replicated on `sharding`)."""
  def zeros():
    f = np.float32(0)
    return {"loss": f, "accuracy": f, "tokens": f, "grad_norm": f, "lr": f, "bad_loss": f,
            "bad_grad_norm": f, "n": np.int32(0), "bad": np.int32(-1)}
  return lambda: jax.device_put(zeros(), sharding)


@functools.partial(jax.jit, donate_argnums=(0,))
def _accumulate(acc: dict, m: dict) -> dict:
  """acc + one step's metrics: sums of loss / accuracy / scored tokens, the last grad_norm
  and lr, and `bad`: the index in the window of the first non-finite step (-1: none)."""
  finite = jnp.isfinite(m["loss"]) & jnp.isfinite(m["grad_norm"])
  first_bad = (acc["bad"] < 0) & ~finite
  lr = m.get("lr", jnp.float32(jnp.nan))
  return {"loss": acc["loss"] + m["loss"], "accuracy": acc["accuracy"] + m["accuracy"],
          "tokens": acc["tokens"] + m["tokens"],
          "grad_norm": m["grad_norm"].astype(jnp.float32), "lr": jnp.float32(lr),
          "bad_loss": jnp.where(first_bad, m["loss"], acc["bad_loss"]),
          "bad_grad_norm": jnp.where(first_bad, m["grad_norm"], acc["bad_grad_norm"]),
          "n": acc["n"] + 1, "bad": jnp.where(first_bad, acc["n"], acc["bad"])}


def mesh_config(train_cfg) -> dict:
  """The mesh a run uses: `train.mesh` without its unset (0) axes, or data parallel over all
  devices when several processes run (their devices cannot be driven without a mesh);
  {} = one device, the plain step."""
  cfg = {k: v for k, v in dict(train_cfg.get("mesh") or {}).items()
         if not (k in axes.MESH_AXES and int(v) == 0)}
  if not any(k in axes.MESH_AXES for k in cfg):
    cfg = {"data": -1} if jax.process_count() > 1 else {}
  return cfg


def _due(step: int, every: int, last: int) -> bool:
  return step == last or (every > 0 and step % every == 0)


def train(config: ml_collections.ConfigDict, workdir: str, *, hooks: Iterable[Hook] = (),
          data: DataSplits | None = None, model: Any = None) -> dict[str, Any]:
  """Train (or resume) the run of `config` in `workdir`; returns final metrics.

  hooks: called as hook(step, metrics) after every update (metrics are device arrays);
  an exception from a hook stops the run like a kill would (checkpoints are kept).
  data: a DataSplits to use instead of building it from config.data (tests).
  model: a Linen module with LanguageModel's call signature to use instead of
    config.model (tests); config.model is then not validated.
  Raises ConfigError before compiling for configs that cannot run, and NonFiniteLossError
  naming the step at which the loss became non-finite (the last good checkpoint is kept;
  the bad state is never saved).
  """
  config_lib.validate(config, check_model=model is None)
  t = config.train
  distributed.initialize(t.get("distributed", "auto"))  # before anything touches a device
  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0  # the one process that prints and writes TensorBoard
  log = tqdm.write if primary else (lambda *a, **k: None)
  data = data or make_data(config)
  n_attention = 0
  if model is None:
    model = build_model(config.model, data.vocab_size)
    n_attention = metrics_lib.count_attention_layers(config.model)
  schedule = optim.lr_schedule(peak_lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps,
                               decay_steps=t.decay_steps)
  optimizer = optim.make_optimizer(t)
  dummy = {"inputs": np.zeros((1, int(t.seq_len)), np.int32)}
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
                               async_save=t.async_checkpoint)
  resume = ckpt.latest_step() is not None
  init_rng = jax.random.PRNGKey(int(config.seed))
  mesh = rules = shardings = batch_sharding = None
  mesh_cfg = mesh_config(t)
  if mesh_cfg:  # sharded: params initialised on the mesh, the step jitted with shardings
    mesh = mesh_lib.make_mesh(mesh_cfg)
    rules = mesh_lib.logical_rules(mesh_cfg)
    batch_sharding = sharding_lib.batch_sharding(mesh, rules)
    row_axes = batch_sharding.spec[0] if batch_sharding.spec else None
    n_rows = math.prod(mesh.shape[a] for a in ((row_axes,) if isinstance(row_axes, str)
                                                else row_axes or ()))
    if int(t.batch_size) % n_rows:
      raise config_lib.ConfigError(
          f"train.batch_size={t.batch_size} does not divide over the {n_rows} devices of the "
          f"mesh's batch axes {row_axes} (mesh {dict(mesh.shape)}); make it a multiple of "
          f"{n_rows} or change train.mesh.")
    if resume:  # the checkpoint is read straight onto this mesh, whatever mesh wrote it
      shardings = sharding_lib.state_shardings(model, optimizer, dummy, mesh, rules)
      state = sharding_lib.abstract_train_state(model, optimizer, dummy, shardings)
    else:
      state, shardings = sharding_lib.create_sharded_train_state(
          model, optimizer, init_rng, dummy, mesh, rules)
  else:
    state = state_lib.create_train_state(model, optimizer, init_rng, dummy)

  best_val = math.inf
  if resume:
    state, data_state, meta = ckpt.restore(state)
    data.train.set_state(data_state)
    saved_best = meta.get("best_val_loss")
    best_val = math.inf if saved_best is None else float(saved_best)
  if mesh is not None:
    log(f"mesh {dict(mesh.shape)}; parameter shardings:\n"
               + sharding_lib.sharding_table(state, shardings))
  start = int(jax.device_get(state.step))

  if mesh is None:
    train_step = step_lib.make_train_step(model, optimizer, grad_accum=int(t.grad_accum),
                                          schedule=schedule)
  else:
    train_step = sharding_lib.make_sharded_train_step(
        model, optimizer, mesh, rules, shardings, grad_accum=int(t.grad_accum),
        schedule=schedule, context_parallel=t.get("context_parallel", "ring"))
  if mesh is None:
    eval_step = step_lib.make_eval_step(model)
    put = _to_device
  else:  # scalars replicated, so every process can read them
    eval_step = jax.jit(step_lib.make_eval_step(model, jit=False),
                        out_shardings=NamedSharding(mesh, P()))
    put = functools.partial(sharding_lib.global_batch, sharding=batch_sharding)
  writer = metrics_lib.MetricWriter(
      os.path.join(workdir, "tb") if t.tensorboard and primary else None, console=primary)
  n_params = metrics_lib.param_count(state.params)
  fpt = metrics_lib.flops_per_token(
      metrics_lib.matmul_param_count(state.params),
      n_attention_layers=n_attention, d_model=int(config.model.get("d_model", 0)),
      seq_len=int(t.seq_len))
  log(f"model: {n_params:,} parameters; training steps {start} -> {t.steps}; "
             f"workdir {workdir}")

  def meta():
    return {"best_val_loss": best_val if math.isfinite(best_val) else None}

  summary: dict[str, Any] = {"params": n_params, "start_step": start}
  last_train: dict[str, float] = {}
  val: dict[str, float] | None = None
  val_step = -1
  pbar = tqdm(total=int(t.steps), initial=start, disable=not (t.progress and primary),
              dynamic_ncols=True, desc="train")
  meter = metrics_lib.Throughput()

  def report(window: "_Window") -> None:
    """Log a closed window of steps: one device->host copy; raises at a non-finite step."""
    nonlocal last_train, meter
    w = jax.device_get(window.acc)
    n = int(w["n"])
    if int(w["bad"]) >= 0:
      s = window.start + int(w["bad"])
      raise NonFiniteLossError(
          s, f"Non-finite loss at step {s} (loss={w['bad_loss']}, grad_norm={w['bad_grad_norm']}"
          f"). Stopped; the last good checkpoint is step {ckpt.latest_step()} under "
          f"{ckpt.directory}/latest (the bad state was not saved). Lower train.lr, raise "
          "train.warmup_steps or check train.grad_clip, then rerun to resume from that "
          "checkpoint.")
    tok_per_s = meter.update(int(t.batch_size) * int(t.seq_len) * n)
    last_train = {"loss": float(w["loss"]) / n, "accuracy": float(w["accuracy"]) / n,
                  "grad_norm": float(w["grad_norm"]), "lr": float(w["lr"]),
                  "tokens_per_s": tok_per_s, "scored_tokens": float(w["tokens"])}
    last_train["bits_per_token"] = metrics_lib.bits_per_token(last_train["loss"])
    util = metrics_lib.mfu(fpt, tok_per_s)
    if util is not None:
      last_train["mfu"] = util
    writer.write(window.end, last_train, prefix="train/")
    pbar.update(n)
    pbar.set_postfix(loss=f"{last_train['loss']:.4f}", mfu=metrics_lib.fmt_mfu(util))

  # Nothing below waits for the device between log points: the batches come from a thread
  # that puts them on the device ahead of time, the metrics are summed on the device, and a
  # window that only logs is read one step late (its copy to the host overlaps the next
  # step), so the device always has the next step queued. Evaluation and checkpoints do wait
  # (a non-finite state must never be saved), every eval_every / ckpt_every steps.
  zero_acc = _zero_accumulator(None if mesh is None else NamedSharding(mesh, P()))
  acc, window_start, lagged = zero_acc(), start, None
  batches = prefetch_to_device(data.train, put=put)
  try:
    for s in range(start, int(t.steps)):
      batch, data_state = next(batches)
      state, m = train_step(state, batch)
      acc = _accumulate(acc, m)
      for hook in hooks:
        hook(s, m)
      if lagged is not None:
        report(lagged)
        lagged = None
      done = s + 1
      eval_due = _due(done, t.eval_every, t.steps)
      ckpt_due = _due(done, t.ckpt_every, t.steps)
      if not (_due(done, t.log_every, t.steps) or eval_due or ckpt_due):
        continue
      window = _Window(acc, window_start, done)
      acc, window_start = zero_acc(), done
      if not (eval_due or ckpt_due):
        for x in jax.tree.leaves(window.acc):
          x.copy_to_host_async()
        lagged = window
        continue
      report(window)
      stop = False
      if eval_due:
        val = step_lib.evaluate(eval_step, state.params, data.validation_batches(), put=put)
        val["bits_per_token"] = metrics_lib.bits_per_token(val["loss"])
        val_step = done
        writer.write(done, val, prefix="val/")
        if val["loss"] < best_val:
          best_val = val["loss"]
          ckpt.save_best(done, state, data_state, meta())
        stop = 0 < t.early_stop_accuracy < val["accuracy"]
      if ckpt_due or stop:
        if not ckpt_lib.all_finite(state.params):
          raise NonFiniteLossError(done, f"Parameters became non-finite by step {done}; the "
                                   f"last good checkpoint is step {ckpt.latest_step()}.")
        ckpt.save(done, state, data_state, meta())
      meter = metrics_lib.Throughput()  # eval and checkpoint time is not training time
      if stop:
        log(f"validation accuracy {val['accuracy']:.4f} > train.early_stop_accuracy="
                   f"{t.early_stop_accuracy}: stopping at step {done}.")
        break
    if lagged is not None:
      report(lagged)
  finally:
    pbar.close()
    ckpt.wait()
    ckpt.close()
    writer.close()

  step = int(jax.device_get(state.step))
  if val is None or val_step != step:
    val = step_lib.evaluate(eval_step, state.params, data.validation_batches(), put=put)
    val["bits_per_token"] = metrics_lib.bits_per_token(val["loss"])
  summary.update(step=step, train=last_train, val=val,
                 best_val_loss=min(best_val, val["loss"]))
  # Sampling runs the cache-based decoder on whatever device holds the params; across several
  # processes those are not all addressable here, so multi-host runs skip it.
  if t.sample_tokens > 0 and data.decode is not None and jax.process_count() == 1:
    summary["sample"] = sample_text(model, state.params, data, config)
    log("sample:\n" + summary["sample"])
  return summary


def sample_text(model, params, data: DataSplits, config) -> str:
  """Prompt with the first tokens of the validation split and decode a continuation."""
  from seqmix.models.generate import generate  # pylint: disable=g-import-not-at-top
  t = config.train
  first = next(iter(data.validation_batches()))
  prompt = [int(x) for x in np.asarray(first["inputs"])[0, :int(t.sample_prompt_len)]]
  n_new = int(t.sample_tokens)
  if config.model.get("pos_embedding", "none") == "learned":
    n_new = min(n_new, int(config.model.max_len) - len(prompt))
  out = generate(model, params, [prompt], max_new_tokens=n_new,
                 rng=jax.random.PRNGKey(int(config.seed) + 1),
                 temperature=float(t.sample_temperature),
                 top_k=int(t.sample_top_k) or None)
  tokens = out[0] if isinstance(out, tuple) else out
  return data.decode(prompt + [int(x) for x in np.asarray(tokens)[0]])
