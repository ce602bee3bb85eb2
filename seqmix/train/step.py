"""The pure, jitted train and eval steps.

Loss: mean cross-entropy (float32 logits) over target positions `!= -100`, token-weighted
across the batch and across micro-batches, so gradient accumulation reproduces the
one-big-batch update.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from seqmix.train.state import TrainState

IGNORE = -100


def token_stats(logits, targets):
  """Summed NLL, scored-token count and correct-prediction count.

  logits [B,T,Vo] (cast to float32), targets [B,T] int (-100 = not scored) -> three float32
  scalars (sum of NLL over scored tokens, number of scored tokens, number argmax-correct).
  """
  mask = targets != IGNORE
  safe = jnp.where(mask, targets, 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  maskf = mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == targets) & mask
  return (jnp.sum(nll * maskf), jnp.sum(maskf), jnp.sum(correct.astype(jnp.float32)))


def _apply(model: nn.Module, params, batch: dict, *, deterministic: bool, rng=None):
  logits, _ = model.apply({"params": params}, batch["inputs"],
                          segment_ids=batch.get("segment_ids"), positions=batch.get("positions"),
                          deterministic=deterministic,
                          rngs=None if rng is None else {"dropout": rng})
  return logits


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, *,
                    grad_accum: int = 1, schedule: Callable | None = None, jit: bool = True):
  """Returns `train_step(state, batch) -> (state, metrics)`.

  batch: dict of [B, T] int arrays (`inputs`, `targets`, optional `segment_ids`,
  `positions`); B must be divisible by `grad_accum`. The B rows are split into `grad_accum`
  micro-batches run one after another (lax.scan) so activation memory is that of B/grad_accum
  rows; gradients of the summed loss are added and divided by the total scored-token count.
  metrics: loss, accuracy, tokens (scored), grad_norm (before clipping), lr (if `schedule`).
  The state argument is donated when jitted.
  """
  def micro_grads(params, micro, rng):
    def loss_sum(p):
      logits = _apply(model, p, micro, deterministic=False, rng=rng)
      s, n, c = token_stats(logits, micro["targets"])
      return s, (n, c)
    (s, (n, c)), g = jax.value_and_grad(loss_sum, has_aux=True)(params)
    return s, n, c, g

  def train_step(state: TrainState, batch: dict[str, Any]):
    rng, step_rng = jax.random.split(state.rng)
    b = batch["inputs"].shape[0]
    if b % grad_accum:
      raise ValueError(f"batch size {b} is not divisible by train.grad_accum={grad_accum}.")
    micro = jax.tree.map(
        lambda x: x.reshape((grad_accum, b // grad_accum) + x.shape[1:]),  # [a, b/a, t]
        dict(batch))

    def body(carry, xs):
      s_acc, n_acc, c_acc, g_acc = carry
      mb, i = xs
      s, n, c, g = micro_grads(state.params, mb, jax.random.fold_in(step_rng, i))
      return (s_acc + s, n_acc + n, c_acc + c, jax.tree.map(jnp.add, g_acc, g)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (jnp.float32(0), jnp.float32(0), jnp.float32(0), zeros)
    (s, n, c, g), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum)))
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda x: x / denom, g)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": s / denom, "accuracy": c / denom, "tokens": n,
               "grad_norm": optax.global_norm(grads)}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=(0,)) if jit else train_step


def make_eval_step(model: nn.Module, *, jit: bool = True):
  """Returns `eval_step(params, batch) -> (nll_sum, tokens, correct)` (float32 scalars)."""
  def eval_step(params, batch):
    logits = _apply(model, params, batch, deterministic=True)
    return token_stats(logits, batch["targets"])
  return jax.jit(eval_step) if jit else eval_step


def evaluate(eval_step, params, batches, *, put=None) -> dict[str, float]:
  """Token-weighted loss and accuracy over every batch of `batches` (the whole split).

  Sums are accumulated on the host in float64, so the result is the mean over all scored
  tokens of the split, not a mean of per-batch means. put: host batch -> device batch
  (default: `jnp.asarray` of each array; the loop passes its sharded / multi-process one).
  """
  put = put or (lambda b: {k: jnp.asarray(v) for k, v in b.items()})
  nll = tokens = correct = 0.0
  pending = []
  for batch in batches:
    pending.append(eval_step(params, put(batch)))
  for s, n, c in jax.device_get(pending):
    nll += float(s)
    tokens += float(n)
    correct += float(c)
  if tokens == 0:
    raise ValueError("The validation split has no scored tokens (all targets are -100).")
  return {"loss": nll / tokens, "accuracy": correct / tokens, "tokens": tokens}
