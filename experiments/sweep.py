"""A grid of mixers × d_model × T × learning rate on a synthetic task, resumable, to JSON lines.

  python -m experiments.sweep --task=mqar --mixers=mha,gla,mamba2 --d_models=64,128,256 \
      --seq_lens=256 --lrs=1e-4,4.6e-4,2.2e-3,1e-2 --steps=2000 --results=out/sweep/mqar.jsonl
  python -m experiments.sweep --task=induction_heads --mixers='mha:position=rope',mamba2 \
      --d_models=64 --seq_lens=256 --extrapolate=2,4,8,16,32,64 --eval_lens=64,128 \
      --results=out/sweep/ih.jsonl
  python -m experiments.plots --results=out/sweep/mqar.jsonl      # the figures

Cells. One cell is one (task, mixer, d_model, T, lr, steps, batch, ...) run; its key is a hash
of that configuration (`Cell.key`). Every finished cell is one line of the results file; a
rerun with the same file skips every cell whose key is there with status "ok" or "oom" (an
"error" cell is tried again), so an interrupted sweep resumes where it stopped and a grown grid
only runs its new cells. The learning rates of a (mixer, d_model, T) group train side by side
as one vmapped model (one compilation); a cell's score is its own, and the table and the
plots take the best learning rate of each group (zoology's protocol: best of 4).

Model (as experiments/configs/mqar.py, zoology's): `--n_layers` blocks, no MLP, LayerNorm,
tied embeddings; a mixer spec `name[:key=value;key=value]` sets the mixer's hyperparameters
(`mha:position=rope;num_heads=2`); bare `mha` is zoology's attention (1 head, no rotary, learned
absolute positions); mixers flagged `needs_positions` in the registry get learned positions too,
except in extrapolation mode, where no model has a learned position table (it could not reach
the longer lengths): there `mha:position=none` is NoPE. Training: AdamW (b2 0.999, weight decay
0.01), cosine decay to 0, no warmup, batches of `--batch` from a fixed training set; token
accuracy over the scored positions of the test set (seed + 10), at T and, with
`--extrapolate=2,4,...`, at every multiple of T, and at every length of `--eval_lens`
(`metrics.accuracy_by_len`).

Each line: `key`, `group`, `status` ("ok" | "oom" | "error"), `config`, `seed`, `metrics`
(accuracy, final_loss, loss_curve [[step, loss], ...], accuracy_by_len, train_tokens_per_s),
`wall_s` (the group's training + evaluation, shared by its vmapped learning rates),
`compile_s`, `params`, `state_bytes` (the decode cache of one sequence at length T, from the
model's `init_cache`: constant for recurrent mixers, the KV cache for attention), `compiled_bytes`
(XLA's memory analysis of the training step: arguments + outputs + temporaries), `peak_bytes`
(the device's peak since the process started, where the backend reports it; None on CPU),
`git_commit`, `device`, `n_devices`, `command`. A cell that does not fit in memory is recorded
with status "oom" and `oom.bytes_requested` (parsed from XLA's RESOURCE_EXHAUSTED message;
None if the message names no size), after the group has been retried one learning rate at a
time.

Devices: the batch is split over every local device (`--devices=0`, default) when it divides
evenly; parameters are replicated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app
from absl import flags
from tqdm import tqdm

from seqmix import registry
from seqmix.data import tasks as tasks_lib
from seqmix.data.common import IGNORE
from seqmix.train import optim

SCHEMA = 1  # bump when a record's fields change meaning
FINAL = ("ok", "oom")  # statuses never rerun


# --------------------------------------------------------------------------------------------
# Cells and their keys.

def parse_mixer(spec: str) -> tuple[str, dict[str, Any]]:
  """'mha:position=rope;num_heads=2' -> ('mha', {'position': 'rope', 'num_heads': 2})."""
  name, _, rest = spec.partition(":")
  kwargs = {}
  for part in filter(None, (p.strip() for p in rest.split(";"))):
    if "=" not in part:
      raise ValueError(f"Mixer spec {spec!r}: {part!r} is not key=value; write e.g. "
                       "'mha:position=rope;num_heads=2'.")
    k, v = (s.strip() for s in part.split("=", 1))
    try:
      kwargs[k] = json.loads(v)
    except json.JSONDecodeError:
      kwargs[k] = v
  return name.strip(), kwargs


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the grid. Every field is part of the key (a changed field is a new cell)."""

  task: str
  mixer: str  # a mixer spec (parse_mixer)
  d_model: int
  seq_len: int
  lr: float
  steps: int
  batch: int
  train_examples: int
  test_examples: int
  n_layers: int = 2
  seed: int = 0
  task_kwargs: tuple[tuple[str, Any], ...] = ()  # sorted items (hashable)
  extrapolate: tuple[int, ...] = ()  # eval at m * seq_len for each m
  eval_lens: tuple[int, ...] = ()  # and at these lengths (e.g. below T: induction heads 64...)

  def config(self) -> dict[str, Any]:
    c = dataclasses.asdict(self)
    c["task_kwargs"] = dict(self.task_kwargs)
    c["extrapolate"] = list(self.extrapolate)
    c["eval_lens"] = list(self.eval_lens)
    if not self.eval_lens:  # keys of cells written before eval_lens existed stay valid
      del c["eval_lens"]
    c["schema"] = SCHEMA
    return c

  @property
  def eval_lengths(self) -> tuple[int, ...]:
    """Every length the cell is evaluated at, sorted: T, its `extrapolate` multiples, eval_lens."""
    lengths = {m * self.seq_len for m in (1,) + tuple(self.extrapolate)} | set(self.eval_lens)
    return tuple(sorted(lengths))

  @property
  def key(self) -> str:
    return _hash(self.config())

  @property
  def group(self) -> str:
    """The cell's key without its learning rate: the runs whose best lr makes one point."""
    c = self.config()
    c.pop("lr")
    return _hash(c)


def _hash(obj) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def grid(*, task: str, mixers: Sequence[str], d_models: Sequence[int], seq_lens: Sequence[int],
         lrs: Sequence[float], **fixed) -> list[Cell]:
  """Every combination, mixers outermost (a mixer's cells run together)."""
  kw = dict(fixed)
  kw["task_kwargs"] = tuple(sorted(dict(kw.get("task_kwargs") or {}).items()))
  kw["extrapolate"] = tuple(int(m) for m in kw.get("extrapolate") or ())
  kw["eval_lens"] = tuple(sorted(int(t) for t in kw.get("eval_lens") or ()))
  return [Cell(task=task, mixer=m, d_model=int(d), seq_len=int(t), lr=float(lr), **kw)
          for m in mixers for t in seq_lens for d in d_models for lr in lrs]


# --------------------------------------------------------------------------------------------
# The results file.

def load_results(path: str) -> list[dict]:
  """Every record of a JSON-lines results file ([] if it does not exist); a torn last line
  (a run killed while writing) is skipped."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def finished_keys(records: Iterable[dict]) -> set[str]:
  return {r["key"] for r in records if r.get("status") in FINAL}


def append_record(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _json_default(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


# --------------------------------------------------------------------------------------------
# Out of memory.

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(bytes|[KMGT]i?B|[KMGT]|B)\b")
_UNITS = {"": 1, "B": 1, "BYTES": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def is_oom(e: BaseException) -> bool:
  """XLA's out-of-memory error (jax.errors.JaxRuntimeError, alias XlaRuntimeError, whose
  message starts RESOURCE_EXHAUSTED)."""
  return isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)


def requested_bytes(message: str) -> int | None:
  """The allocation size an XLA RESOURCE_EXHAUSTED message names, in bytes (None if none).

  Handles 'while trying to allocate 1234 bytes', 'allocating 1.50GiB', 'request for 2.0G
  (2147483648B)': the first size after the word 'allocat...' or 'request', exact byte counts
  in parentheses preferred.
  """
  exact = re.search(r"\((\d+)\s*B\)", message)
  if exact:
    return int(exact.group(1))
  m = re.search(r"(allocat\w*|request\w*)(.*)", message, re.IGNORECASE | re.DOTALL)
  if not m:
    return None
  size = _SIZE.search(m.group(2)[:120])
  if not size:
    return None
  unit = size.group(2).upper().replace("IB", "").replace("B", "") if size.group(2).lower() != \
      "bytes" else "BYTES"
  return int(float(size.group(1)) * _UNITS[unit])


def oom_record(e: BaseException, phase: str) -> dict:
  msg = str(e)
  return {"bytes_requested": requested_bytes(msg), "phase": phase, "message": msg[:500]}


# --------------------------------------------------------------------------------------------
# Model, data, training.

def model_config(cell: Cell, vocab_size: int) -> ml_collections.ConfigDict:
  """The `model` block (experiments/configs/mqar.py's, zoology's) for this cell."""
  from experiments.configs import mqar as mqar_config  # pylint: disable=g-import-not-at-top
  name, kwargs = parse_mixer(cell.mixer)
  info = registry.get(name)
  if name == "mha":
    kwargs = {"num_heads": 1, "position": "none", **kwargs}
  else:
    fit = mqar_config._fit_heads(name, cell.d_model)  # pylint: disable=protected-access
    kwargs = {**fit.get(name, {}), **kwargs}
  if name == "cosformer":
    # cosFormer's re-weighting cos(pi (i - j) / 2M) turns negative once i - j >= M, so the
    # horizon M must cover the longest evaluation length, not only the training length T.
    longest = max(cell.eval_lengths)
    kwargs = {"max_len": longest, **kwargs}
    if kwargs["max_len"] < longest:
      raise ValueError(f"cosformer max_len={kwargs['max_len']} is below the longest evaluation "
                       f"length {longest} of cell {cell.mixer!r} (T={cell.seq_len}, "
                       f"extrapolate={cell.extrapolate}, eval_lens={cell.eval_lens}); drop "
                       f"max_len from the mixer spec or set it >= {longest}.")
  no_position = (name == "mha" and kwargs.get("position") == "none") or info.needs_positions
  learned = no_position and not (cell.extrapolate or any(t > cell.seq_len
                                                         for t in cell.eval_lens))
  m = ml_collections.ConfigDict()
  m.vocab_size = vocab_size
  m.d_model = cell.d_model
  m.n_layers = cell.n_layers
  m.mixer = name
  m.mixer_kwargs = {name: kwargs} if kwargs else {}
  m.mlp = "none"
  m.norm = "layernorm"
  m.norm_eps = 1e-5
  m.use_bias = True
  m.tie_embeddings = True
  m.pos_embedding = "learned" if learned else "none"
  m.max_len = cell.seq_len
  m.dropout = 0.0
  m.dtype = "float32"
  m.param_dtype = "float32"
  return m


def build_model(cell: Cell, vocab_size: int):
  from seqmix.train import loop  # pylint: disable=g-import-not-at-top
  return loop.build_model(model_config(cell, vocab_size), vocab_size)


def state_bytes(model, seq_len: int) -> int | None:
  """Bytes of the decode cache of one sequence at length `seq_len` (all layers), or None
  when the mixer builds no cache."""
  try:
    shapes = jax.eval_shape(lambda: model.init_cache(1, seq_len))
  except Exception:  # pylint: disable=broad-except  # a mixer without decoding: no number
    return None
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes)))


def scored(inputs: np.ndarray, targets: np.ndarray):
  """(inputs [N,T], positions [N,P], targets [N,P]): the P scored positions of each row
  (padded with target -100), so logits are only formed there."""
  mask = targets != IGNORE
  p = max(1, int(mask.sum(1).max()))
  pos = np.argsort(~mask, axis=1, kind="stable")[:, :p].astype(np.int32)  # scored first
  return inputs, pos, np.take_along_axis(targets, pos, axis=1)


def _nll(model, params, x, pos, y):
  logits, _ = model.apply({"params": params}, x, deterministic=True, logit_positions=pos)
  mask = y != IGNORE
  ll = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(ll, jnp.where(mask, y, 0)[..., None], -1)[..., 0]
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


def _batch_sharding(batch: int, devices: int):
  """A NamedSharding splitting the batch over the devices, or None (one device, or a batch
  that does not divide)."""
  devs = jax.devices() if devices <= 0 else jax.devices()[:devices]
  if len(devs) <= 1 or batch % len(devs):
    return None, 1
  mesh = jax.sharding.Mesh(np.array(devs), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")), len(devs)


@dataclasses.dataclass
class GroupResult:
  """What `train_group` measured for n learning rates trained side by side."""

  accuracy: dict[int, np.ndarray]  # eval length -> [n] accuracy (NaN: that length OOMed)
  eval_oom: dict[int, dict]  # eval length -> oom record
  final_loss: np.ndarray  # [n]
  loss_curve: list[tuple[int, list[float]]]  # (step, [n] mean loss over the chunk)
  params: int
  state_bytes: int | None
  compiled_bytes: int | None
  compile_s: float
  train_s: float
  tokens_per_s: float
  n_devices: int


def train_group(cells: Sequence[Cell], train_data, test_data: dict[int, Any], vocab_size: int,
                *, devices: int = 0, log_every: int = 100,
                eval_tokens: int = 1 << 18) -> GroupResult:
  """Train the cells (one group: equal but for lr) as one vmapped model; evaluate each.

  train_data: (inputs, positions, targets) from `scored`; test_data: eval length -> the same.
  Raises XLA's RESOURCE_EXHAUSTED error if training does not fit (the caller records it); an
  evaluation length that does not fit is recorded in `eval_oom` and scored NaN.
  """
  c0 = cells[0]
  model = build_model(c0, vocab_size)
  sharding, n_dev = _batch_sharding(c0.batch, devices)
  x_tr, p_tr, y_tr = (jnp.asarray(a) for a in train_data)
  n = len(cells)
  lrs = jnp.asarray([c.lr for c in cells], jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(c0.seed), n)
  params = jax.jit(jax.vmap(lambda k: model.init(k, x_tr[:1, :c0.seq_len])["params"]))(keys)
  n_params = int(sum(x.size for x in jax.tree.leaves(params)) // n)
  tx = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999),
                   optax.add_decayed_weights(0.01, mask=optim.decay_mask),
                   optax.scale_by_schedule(optax.cosine_decay_schedule(1.0, c0.steps)))
  opt_state = jax.vmap(tx.init)(params)

  def one(carry, key):
    params, opt_state = carry
    idx = jax.random.randint(key, (c0.batch,), 0, x_tr.shape[0])
    x, pos, y = x_tr[idx], p_tr[idx], y_tr[idx]
    if sharding is not None:
      x, pos, y = (jax.lax.with_sharding_constraint(a, sharding) for a in (x, pos, y))

    def upd(p, s, lr):
      loss, g = jax.value_and_grad(lambda p: _nll(model, p, x, pos, y))(p)
      u, s = tx.update(g, s, p)
      return jax.tree.map(lambda a, b: a - lr * b, p, u), s, loss
    params, opt_state, loss = jax.vmap(upd)(params, opt_state, lrs)
    return (params, opt_state), loss

  def chunk(params, opt_state, keys):
    (params, opt_state), losses = jax.lax.scan(one, (params, opt_state), keys)
    return params, opt_state, losses  # losses [chunk, n]

  chunk_jit = jax.jit(chunk, donate_argnums=(0, 1))
  # One chunk length dividing the budget: one compilation (a remainder chunk would be a second).
  size = math.gcd(c0.steps, max(1, min(log_every, c0.steps)))
  key = jax.random.PRNGKey(c0.seed + 1)
  t0 = time.time()
  compiled = chunk_jit.lower(params, opt_state, jax.random.split(key, size)).compile()
  compile_s = time.time() - t0
  compiled_bytes = _compiled_bytes(compiled)
  curve, losses, done = [], None, 0
  t0 = time.time()
  for i in range(c0.steps // size):
    params, opt_state, losses = compiled(params, opt_state,
                                         jax.random.split(jax.random.fold_in(key, i), size))
    done += size
    curve.append((done, np.asarray(jnp.mean(losses, 0)).tolist()))
  jax.block_until_ready(params)
  train_s = time.time() - t0
  final_loss = np.asarray(losses[-1])

  @jax.jit
  def correct(p, x, pos, y):
    logits, _ = model.apply({"params": p}, x, deterministic=True, logit_positions=pos)
    mask = y != IGNORE
    return jnp.sum((jnp.argmax(logits, -1) == y) & mask), jnp.sum(mask)

  accuracy, eval_oom = {}, {}
  for length, (x_te, p_te, y_te) in sorted(test_data.items()):
    rows = max(1, min(len(x_te), eval_tokens // length))
    pad = -len(x_te) % rows  # fixed-shape batches (one compilation): padding rows score nothing
    x_te, p_te = (np.pad(a, ((0, pad), (0, 0))) for a in (x_te, p_te))
    y_te = np.pad(y_te, ((0, pad), (0, 0)), constant_values=IGNORE)
    acc = np.full(n, np.nan)
    try:
      for j in range(n):
        p = jax.tree.map(lambda a, j=j: a[j], params)
        hits = total = 0
        for s in range(0, len(x_te), rows):
          h, t = correct(p, *(jnp.asarray(a[s:s + rows]) for a in (x_te, p_te, y_te)))
          hits, total = hits + int(h), total + int(t)
        acc[j] = hits / max(total, 1)
    except jax.errors.JaxRuntimeError as e:
      if not is_oom(e):
        raise
      eval_oom[length] = oom_record(e, f"eval T={length}")
    accuracy[length] = acc
  tokens = n * c0.batch * c0.seq_len * c0.steps
  return GroupResult(accuracy=accuracy, eval_oom=eval_oom, final_loss=final_loss,
                     loss_curve=curve, params=n_params, state_bytes=state_bytes(model, c0.seq_len),
                     compiled_bytes=compiled_bytes, compile_s=compile_s, train_s=train_s,
                     tokens_per_s=tokens / max(train_s, 1e-9), n_devices=n_dev)


def _compiled_bytes(compiled) -> int | None:
  try:
    ma = compiled.memory_analysis()
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None


def peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  v = stats.get("peak_bytes_in_use")
  return None if v is None else int(v)


def git_commit() -> str | None:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                         check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return sha + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


# --------------------------------------------------------------------------------------------
# The grid.

class _Data:
  """Train / test arrays per (task, options, T, n, seed), built once per sweep."""

  def __init__(self):
    self._cache: dict[Any, Any] = {}

  def task(self, cell: Cell) -> tasks_lib.Task:
    return tasks_lib.make_task(cell.task, **dict(cell.task_kwargs))

  def _get(self, key, fn):
    if key not in self._cache:
      self._cache[key] = fn()
    return self._cache[key]

  def train(self, cell: Cell):
    task = self.task(cell)
    return self._get(("train", cell.task, cell.task_kwargs, cell.seq_len, cell.train_examples,
                      cell.seed), lambda: scored(*task.train(
                          seq_len=cell.seq_len, num_examples=cell.train_examples,
                          seed=cell.seed)))

  def test(self, cell: Cell) -> dict[int, Any]:
    task = self.task(cell)
    out = {}
    for length in cell.eval_lengths:
      out[length] = self._get(
          ("test", cell.task, cell.task_kwargs, length, cell.seq_len, cell.test_examples,
           cell.seed), lambda length=length: scored(*task.test(
               seq_len=length, num_examples=cell.test_examples, seed=cell.seed,
               train_seq_len=cell.seq_len)))
    return out


def _base_record(cell: Cell, status: str) -> dict:
  return {"key": cell.key, "group": cell.group, "status": status, "config": cell.config(),
          "seed": cell.seed, "git_commit": _COMMIT[0], "device": jax.devices()[0].device_kind,
          "backend": jax.default_backend(), "command": _command(),
          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


_COMMIT = [None]


def _command() -> str:
  """The command line, as `python -m experiments.<name> ...` when run as a module here."""
  argv = list(sys.argv)
  here = os.path.dirname(os.path.abspath(__file__))
  if argv and argv[0].endswith(".py") and os.path.dirname(os.path.abspath(argv[0])) == here:
    module = "experiments." + os.path.splitext(os.path.basename(argv[0]))[0]
    argv = ["python", "-m", module] + argv[1:]
  return " ".join(argv)


def run_group(cells: Sequence[Cell], data: _Data, *, devices: int = 0, log_every: int = 100,
              vmap_lrs: bool = True, train_fn: Callable[..., GroupResult] = train_group
              ) -> list[dict]:
  """Records for `cells` (one group). OOM while training all lrs together retries them one
  at a time; a cell that still does not fit is recorded as "oom"; any other exception is
  recorded as "error" (retried by the next sweep)."""
  if vmap_lrs and len(cells) > 1:
    try:
      return _records(cells, data, devices, log_every, train_fn)
    except jax.errors.JaxRuntimeError as e:
      if not is_oom(e):
        raise
      tqdm.write(f"[sweep] {cells[0].mixer} d={cells[0].d_model} T={cells[0].seq_len}: out of "
                 f"memory with {len(cells)} lrs side by side; retrying one at a time.")
  out = []
  for c in cells:
    try:
      out += _records([c], data, devices, log_every, train_fn)
    except jax.errors.JaxRuntimeError as e:
      if not is_oom(e):
        raise
      r = _base_record(c, "oom")
      r["oom"] = oom_record(e, "train")
      out.append(r)
  return out


def _records(cells, data, devices, log_every, train_fn) -> list[dict]:
  c0 = cells[0]
  vocab = data.task(c0).vocab_size
  t0 = time.time()
  res = train_fn(cells, data.train(c0), data.test(c0), vocab, devices=devices,
                 log_every=log_every)
  wall = time.time() - t0
  out = []
  for j, c in enumerate(cells):
    r = _base_record(c, "ok")
    by_len = {str(k): (None if np.isnan(v[j]) else float(v[j])) for k, v in res.accuracy.items()}
    r["metrics"] = {
        "accuracy": by_len[str(c.seq_len)],
        "accuracy_by_len": by_len,
        "final_loss": float(res.final_loss[j]),
        "loss_curve": [[s, float(v[j])] for s, v in res.loss_curve],
        "train_tokens_per_s": res.tokens_per_s,
    }
    if res.eval_oom:
      r["eval_oom"] = {str(k): v for k, v in res.eval_oom.items()}
    r.update(wall_s=wall, compile_s=res.compile_s, train_s=res.train_s, lrs_vmapped=len(cells),
             params=res.params, state_bytes=res.state_bytes,
             compiled_bytes=res.compiled_bytes, peak_bytes=peak_bytes(),
             n_devices=res.n_devices)
    out.append(r)
  return out


def run_grid(cells: Sequence[Cell], results_path: str, *, devices: int = 0,
             log_every: int = 100, vmap_lrs: bool = True, progress: bool = True,
             train_fn: Callable[..., GroupResult] = train_group) -> dict[str, int]:
  """Run every cell not yet finished in `results_path`; returns counts {ran, skipped, oom,
  error}. Records are appended as each group ends."""
  _COMMIT[0] = _COMMIT[0] or git_commit()
  done = finished_keys(load_results(results_path))
  todo = [c for c in cells if c.key not in done]
  counts = {"ran": 0, "skipped": len(cells) - len(todo), "oom": 0, "error": 0}
  groups: dict[str, list[Cell]] = {}
  for c in todo:
    groups.setdefault(c.group, []).append(c)
  data = _Data()
  bar = tqdm(total=len(cells), initial=counts["skipped"], disable=not progress, desc="sweep",
             dynamic_ncols=True)
  try:
    for cs in groups.values():
      c0 = cs[0]
      bar.set_postfix_str(f"{c0.mixer} d={c0.d_model} T={c0.seq_len} ({len(cs)} lrs)")
      try:
        records = run_group(cs, data, devices=devices, log_every=log_every, vmap_lrs=vmap_lrs,
                            train_fn=train_fn)
      except Exception as e:  # pylint: disable=broad-except  # recorded, the sweep goes on
        records = []
        for c in cs:
          r = _base_record(c, "error")
          r["error"] = f"{type(e).__name__}: {e}"[:1000]
          records.append(r)
        tqdm.write(f"[sweep] {c0.mixer} d={c0.d_model} T={c0.seq_len} failed: "
                   f"{type(e).__name__}: {str(e)[:200]}")
      for r in records:
        append_record(results_path, r)
        counts["ran" if r["status"] == "ok" else r["status"]] += 1
      bar.update(len(cs))
  finally:
    bar.close()
  return counts


# --------------------------------------------------------------------------------------------
# Summaries.

def best_of_lrs(records: Iterable[dict]) -> list[dict]:
  """One record per group: the ok record with the highest accuracy (ties: the lower lr); a
  group with no ok record is represented by its oom/error record. Later records of a key win
  (a retried cell)."""
  latest: dict[str, dict] = {}
  for r in records:
    latest[r["key"]] = r
  groups: dict[str, list[dict]] = {}
  for r in latest.values():
    groups.setdefault(r["group"], []).append(r)
  out = []
  for rs in groups.values():
    ok = [r for r in rs if r["status"] == "ok" and r["metrics"]["accuracy"] is not None]
    if ok:
      out.append(max(ok, key=lambda r: (r["metrics"]["accuracy"], -r["config"]["lr"])))
    else:
      out.append(rs[0])
  return out


def table(records: Iterable[dict]) -> str:
  """Best-of-lrs accuracy: a row per (task, T, mixer), a column per d_model ('oom' / 'err'
  where the group did not finish, 'eval-oom' where training fit but evaluation at T did not)."""
  best = best_of_lrs(records)
  ds = sorted({r["config"]["d_model"] for r in best})
  rows: dict[tuple, dict[int, str]] = {}
  for r in best:
    c = r["config"]
    acc = (r.get("metrics") or {}).get("accuracy")
    cell = ("oom" if r["status"] == "oom" else "err" if r["status"] == "error"
            else "eval-oom" if acc is None else f"{acc:.3f}")
    rows.setdefault((c["task"], c["seq_len"], c["mixer"]), {})[c["d_model"]] = cell
  width = max([len(k[2]) for k in rows] + [5])
  lines = [f"{'task':<18} {'T':>6}  {'mixer':<{width}} " + " ".join(f"{'d=' + str(d):>7}"
                                                                     for d in ds)]
  for (task, t, mixer), vals in sorted(rows.items()):
    lines.append(f"{task:<18} {t:>6}  {mixer:<{width}} "
                 + " ".join(f"{vals.get(d, '-'):>7}" for d in ds))
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line.

def define_flags() -> None:
  """The command line's flags (defined only when run as a script, so importing this
  module, e.g. from experiments.plots or the tests, defines none)."""
  flags.DEFINE_enum("task", "mqar", sorted(tasks_lib.TASKS), "Synthetic task.")
  flags.DEFINE_string("task_kwargs", "{}", "Task options as JSON, e.g. '{\"vocab_size\": 256}' "
                      "(seqmix.data.tasks).")
  flags.DEFINE_list("mixers", ["mha"], "Mixer specs: name[:key=value;key=value].")
  flags.DEFINE_list("d_models", ["64", "128", "256"], "d_model values.")
  flags.DEFINE_list("seq_lens", ["256"], "Training lengths T.")
  flags.DEFINE_list("lrs", ["1e-4", "4.6e-4", "2.2e-3", "1e-2"],
                    "Learning rates (zoology: np.logspace(-4, -2, 4)); the best one is kept.")
  flags.DEFINE_integer("steps", 2000, "Training steps per cell (a fixed budget).")
  flags.DEFINE_integer("batch", 256, "Batch size (global).")
  flags.DEFINE_integer("train_examples", 100_000, "Training-set size.")
  flags.DEFINE_integer("test_examples", 3_000, "Test-set size (at every eval length).")
  flags.DEFINE_integer("n_layers", 2, "Blocks.")
  flags.DEFINE_integer("seed", 0, "Seed (init, data; test set seed + 10).")
  flags.DEFINE_list("extrapolate", [], "Eval multiples of T, e.g. 2,4,8,16 (empty: off).")
  flags.DEFINE_list("eval_lens", [], "Also eval at these lengths, e.g. 64,128 (below T).")
  flags.DEFINE_string("results", "out/sweep/results.jsonl",
                      "JSON-lines results file (appended; finished cells are skipped).")
  flags.DEFINE_integer("devices", 0, "Local devices to split the batch over (0: all).")
  flags.DEFINE_integer("log_every", 100, "Steps per loss-curve point (taken as "
                       "gcd(log_every, steps): one compiled chunk).")
  flags.DEFINE_bool("vmap_lrs", True, "Train a group's lrs side by side as one vmapped model "
                    "(False: one at a time, 1/n of the memory).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  cells = grid(task=f.task, mixers=f.mixers, d_models=[int(d) for d in f.d_models],
               seq_lens=[int(t) for t in f.seq_lens], lrs=[float(x) for x in f.lrs],
               steps=f.steps, batch=f.batch, train_examples=f.train_examples,
               test_examples=f.test_examples, n_layers=f.n_layers, seed=f.seed,
               task_kwargs=json.loads(f.task_kwargs),
               extrapolate=[int(m) for m in f.extrapolate],
               eval_lens=[int(t) for t in f.eval_lens])
  unknown = sorted({parse_mixer(c.mixer)[0] for c in cells} - set(registry.names()))
  if unknown:
    raise app.UsageError(f"Unregistered mixers {unknown}; registered: {registry.names()}.")
  print(f"[sweep] {len(cells)} cells on {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"results {f.results}", flush=True)
  counts = run_grid(cells, f.results, devices=f.devices, log_every=f.log_every,
                    vmap_lrs=f.vmap_lrs)
  print(f"[sweep] {counts}")
  keys = {c.key for c in cells}
  print(table(r for r in load_results(f.results) if r["key"] in keys))


if __name__ == "__main__":
  define_flags()
  app.run(main)
