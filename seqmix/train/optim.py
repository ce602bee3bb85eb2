"""AdamW with nanoGPT's learning-rate schedule, global-norm clipping and a weight-decay mask.

Gradient accumulation is not an optax wrapper here: `seqmix.train.step` runs the micro-batches
inside the jitted step and sums token-weighted gradients, so an accumulated update equals the
update of one big batch (optax.MultiSteps averages per-micro-batch *means*, which differs when
micro-batches score different numbers of tokens).
"""

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

# A parameter whose path matches one of these never decays when `decay_embeddings=False`.
EMBEDDING_PATTERN = re.compile(r"embed|wte|wpe", re.IGNORECASE)


def lr_schedule(*, peak_lr: float, min_lr: float, warmup_steps: int, decay_steps: int):
  """nanoGPT's schedule as an optax schedule: step -> learning rate.

  Linear warmup `peak_lr * (step + 1) / (warmup_steps + 1)` for `step < warmup_steps`, then
  cosine from `peak_lr` to `min_lr` reached at `decay_steps`, then `min_lr`.
  """
  if decay_steps <= warmup_steps:
    raise ValueError(f"train.decay_steps={decay_steps} must exceed train.warmup_steps="
                     f"{warmup_steps}; set decay_steps to the number of training steps.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * (step + 1.0) / (warmup_steps + 1.0)
    ratio = jnp.clip((step - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
    cosine = min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (peak_lr - min_lr)
    return jnp.where(step < warmup_steps, warm, cosine)

  return schedule


def decay_mask(params, *, decay_embeddings: bool = True):
  """Pytree of bools: True where weight decay applies.

  Decays every parameter with ndim >= 2 (matrices, and embeddings like nanoGPT); never
  vectors or scalars (norm scales, biases, per-head gates). `decay_embeddings=False` also
  spares parameters whose path names an embedding (`EMBEDDING_PATTERN`).
  """
  def leaf(path, p):
    if jnp.ndim(p) < 2:
      return False
    if not decay_embeddings and EMBEDDING_PATTERN.search(jax.tree_util.keystr(path)):
      return False
    return True
  return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(train_cfg: Any) -> optax.GradientTransformation:
  """Clip by global norm (if `grad_clip > 0`), then AdamW with the schedule and the mask.

  train_cfg fields: lr, min_lr, warmup_steps, decay_steps, b1, b2, eps, weight_decay,
  decay_embeddings, grad_clip.
  """
  schedule = lr_schedule(peak_lr=train_cfg.lr, min_lr=train_cfg.min_lr,
                         warmup_steps=train_cfg.warmup_steps, decay_steps=train_cfg.decay_steps)
  decay_embeddings = bool(train_cfg.decay_embeddings)
  adamw = optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                      weight_decay=train_cfg.weight_decay,
                      mask=lambda p: decay_mask(p, decay_embeddings=decay_embeddings))
  if train_cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), adamw)
  return adamw
