"""The train state: everything a resumed run needs besides the data iterator's position."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """A pytree; `train_step` maps it to the next one.

  step: int32 scalar, number of optimizer updates applied so far.
  params: the model parameters (plain arrays; logical-axis boxes removed).
  opt_state: the optax state.
  rng: a raw uint32 PRNG key [2]; each step splits it (dropout), so resuming from a
    checkpoint draws the same dropout masks as the uninterrupted run.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_params(model: nn.Module, rng: jax.Array, batch: dict):
  """Initialise `model` on the shapes of `batch` (`inputs` [B,T]); returns unboxed params."""
  tokens = jnp.asarray(batch["inputs"][:1])
  # One compiled init instead of hundreds of eagerly dispatched ops.
  init = jax.jit(lambda r: nn.meta.unbox(
      model.init({"params": r, "dropout": r}, tokens, deterministic=True)["params"]))
  return init(rng)


def create_train_state(model: nn.Module, optimizer: optax.GradientTransformation,
                       rng: jax.Array, batch: dict) -> TrainState:
  """Fresh state: params from `rng`, optimizer state, step 0, a derived data-independent rng."""
  init_rng, step_rng = jax.random.split(rng)
  params = init_params(model, init_rng, batch)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=jax.jit(optimizer.init)(params), rng=step_rng)
