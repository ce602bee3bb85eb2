"""The `train` block every experiment config starts from, and config validation.

`validate(config)` runs before anything is compiled and raises `ConfigError` with a
message that names the field and says what to change.
"""

import dataclasses
import difflib
from typing import Any

import ml_collections

TOP_LEVEL = ("seed", "model", "data", "train")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A config that cannot run; the message says which field and how to fix it."""


def train_defaults() -> ml_collections.ConfigDict:
  """Defaults of the `train` block (each field documented once, here)."""
  c = ml_collections.ConfigDict()
  c.steps = 1000              # optimizer updates in the whole run
  c.batch_size = 64           # sequences per optimizer update (all micro-batches together)
  c.seq_len = 256             # tokens per sequence (the model's context)
  c.grad_accum = 1            # micro-batches per update; batch_size must be divisible by it
  c.lr = 1e-3                 # peak learning rate, reached after warmup
  c.min_lr = 1e-4             # learning rate at and after decay_steps (cosine floor)
  c.warmup_steps = 100        # linear warmup steps (nanoGPT: lr * (step+1) / (warmup+1))
  c.decay_steps = 1000        # step at which the cosine reaches min_lr (usually = steps)
  c.b1 = 0.9                  # AdamW beta1
  c.b2 = 0.99                 # AdamW beta2
  c.eps = 1e-8                # AdamW epsilon (torch's default, as nanoGPT)
  c.weight_decay = 0.1        # decoupled weight decay on params with ndim >= 2
  c.decay_embeddings = True   # also decay embedding tables (nanoGPT does)
  c.grad_clip = 1.0           # global-norm clip; 0 disables
  c.log_every = 10            # steps between console/TensorBoard training metrics
  c.eval_every = 250          # steps between validation passes over the whole split; 0: end only
  c.ckpt_every = 250          # steps between periodic checkpoints; 0: end only
  c.keep_checkpoints = 2      # periodic checkpoints kept (the best-val one is kept apart)
  c.async_checkpoint = True   # orbax async save (training continues while it writes)
  c.early_stop_accuracy = 0.0 # stop once validation accuracy exceeds this (zoology: 0.99); 0 off
  c.sample_tokens = 0         # tokens generated at the end from a validation prompt; 0 off
  c.sample_prompt_len = 16    # prompt length (tokens from the start of the validation split)
  c.sample_temperature = 0.8  # sampling temperature for that sample
  c.sample_top_k = 0          # top-k for that sample; 0: no top-k
  c.tensorboard = True        # write TensorBoard event files under <workdir>/tb
  c.progress = True           # show a tqdm progress bar
  # Device mesh (seqmix.parallel.mesh.make_mesh): axis sizes, one of them may be -1 (all the
  # remaining devices); 0 = not set (size 1 once any axis is set). None set: one device, the
  # plain step. The fields exist so the command line can set them
  # (--config.train.mesh.fsdp=8); a config may add `rules` (logical-axis rules).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 0
  c.mesh.fsdp = 0
  c.mesh.tensor = 0
  c.mesh.sequence = 0
  c.mesh.axis_types = "auto"  # "auto" or "explicit" (jax 0.11 mesh axis types)
  # jax.distributed.initialize() (seqmix.parallel.distributed): "auto" when the launcher
  # started several processes (TPU pod slice, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS),
  # "on" always, "off" never. Several processes without a mesh train data-parallel.
  c.distributed = "auto"
  # Softmax attention when the mesh shards the sequence: "ring" (K/V passed around the
  # `sequence` axis with ppermute) or "allgather" (one all-gather of K/V).
  c.context_parallel = "ring"
  return c


def _unknown(kind: str, key: str, valid) -> ConfigError:
  close = difflib.get_close_matches(key, list(valid), n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  return ConfigError(f"Unknown field {kind}.{key}.{hint} Valid fields of {kind}: "
                     f"{', '.join(sorted(valid))}.")


def _check_keys(kind: str, block: Any, valid) -> None:
  for key in block.keys():
    if key not in valid:
      raise _unknown(kind, key, valid)


def model_fields() -> tuple[str, ...] | None:
  """Field names of `seqmix.models.lm.LanguageModel`, or None if it is not importable."""
  try:
    from seqmix.models import lm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tuple(f.name for f in dataclasses.fields(lm.LanguageModel)
               if f.name not in ("parent", "name"))


def _mixer_fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def _field_default(cls, field: str):
  for f in dataclasses.fields(cls):
    if f.name == field and f.default is not dataclasses.MISSING:
      return f.default
  return None


# train keys a config may leave out (configs written before they existed keep working).
OPTIONAL_TRAIN = ("mesh", "distributed", "context_parallel")


def validate(config: ml_collections.ConfigDict, *, check_model: bool = True) -> None:
  """Raise ConfigError for a config that cannot train; does not touch data or devices.

  check_model=False skips the model block (a caller that supplies its own module).
  """
  _check_keys("config", config, TOP_LEVEL)
  for key in TOP_LEVEL:
    if key not in config:
      raise ConfigError(f"config.{key} is missing; start the config from an existing one in "
                        "experiments/configs/ (train: seqmix.train.config.train_defaults()).")
  t = config.train
  _check_keys("train", t, train_defaults().keys())
  for key in train_defaults().keys():
    if key not in t and key not in OPTIONAL_TRAIN:
      raise ConfigError(f"config.train.{key} is missing; build the train block from "
                        "seqmix.train.config.train_defaults().")
  for key in ("steps", "batch_size", "seq_len", "grad_accum"):
    if int(t[key]) <= 0:
      raise ConfigError(f"train.{key}={t[key]} must be a positive integer.")
  if t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum="
                      f"{t.grad_accum}; the update splits the batch into equal micro-batches.")
  if t.get("context_parallel", "ring") not in ("ring", "allgather"):
    raise ConfigError(f"train.context_parallel={t.context_parallel!r}: choose 'ring' or "
                      "'allgather'.")
  if t.decay_steps <= t.warmup_steps:
    raise ConfigError(f"train.decay_steps={t.decay_steps} must exceed train.warmup_steps="
                      f"{t.warmup_steps}; usually decay_steps = steps.")
  if str(t.get("distributed", "auto")).lower() not in ("auto", "on", "off"):
    raise ConfigError(f"train.distributed={t.distributed!r} must be 'auto', 'on' or 'off'.")
  if not 0 <= t.min_lr <= t.lr:
    raise ConfigError(f"train.min_lr={t.min_lr} must lie in [0, train.lr={t.lr}].")

  if check_model:
    _validate_model(config.model, t)


def _validate_model(m, t) -> None:
  from seqmix import registry  # pylint: disable=g-import-not-at-top
  from seqmix.mixers.base import check_divisible  # pylint: disable=g-import-not-at-top
  valid = model_fields()
  if valid is not None:
    _check_keys("model", m, valid)
  for key in ("dtype", "param_dtype"):
    if key in m and str(m[key]) not in DTYPES:
      raise ConfigError(f"model.{key}={m[key]!r} is not one of {DTYPES}.")
  if m.get("pos_embedding", "none") == "learned" and int(m.get("max_len", 0)) < t.seq_len:
    raise ConfigError(f"model.max_len={m.get('max_len')} is shorter than train.seq_len="
                      f"{t.seq_len}; learned positions need max_len >= seq_len.")
  if str(m.mixer).strip() == "none":  # LanguageModel's control model without token mixing
    return
  try:
    names = registry.expand_pattern(m.mixer, int(m.n_layers))
  except KeyError as e:
    raise ConfigError(f"model.mixer={m.mixer!r}: {e.args[0]}") from None
  except ValueError as e:
    raise ConfigError(f"model.mixer: {e}") from None
  kwargs = dict(m.get("mixer_kwargs", None) or {})
  for name, kw in kwargs.items():
    if name not in {registry.base_name(n) for n in names}:
      raise ConfigError(f"model.mixer_kwargs has an entry for {name!r}, which is not in the "
                        f"layer pattern {sorted(set(names))}; rename or remove it.")
    fields = _mixer_fields(registry.get(name).cls)
    for key in dict(kw):
      if key not in fields:
        raise _unknown(f"model.mixer_kwargs.{name}", key, fields - {"d_model", "layer_idx",
                                                                  "n_layers", "dtype",
                                                                  "param_dtype"})
    cls = registry.get(name).cls
    heads = dict(kw).get("num_heads", _field_default(cls, "num_heads"))
    head_dim = dict(kw).get("head_dim", _field_default(cls, "head_dim"))
    if heads is not None and head_dim is None:  # head width derived as d_model // num_heads
      try:
        check_divisible("model.d_model", int(m.d_model), int(heads),
                        f"model.mixer_kwargs.{name}.num_heads")
      except ValueError as e:
        raise ConfigError(str(e)) from None
