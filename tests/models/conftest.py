"""Fixtures of the model tests: the attention mixer (`mha`) once it is registered, and the
toy shift mixer (`seqmix.mixers.testing.ToyShiftMixer`) registered as "toy" per test module,
which makes a second, constant-state mixer for hybrid patterns."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import registry
from seqmix.mixers import testing as mt

TOY = "toy"


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
  with mt.temporarily_registered(TOY, mt.ToyShiftMixer, test_kwargs={"taps": 3}):
    yield TOY


@pytest.fixture(scope="module")
def mixer(toy_registered):
  """(name, mixer_kwargs) of the main mixer of the model tests: mha if registered, else toy."""
  if "mha" in registry.names():
    return "mha", {"mha": dict(registry.get("mha").test_kwargs)}
  return toy_registered, {}


def random_params(model, tokens, *, seed: int = 0, std: float = 0.1):
  """Random params of the model's shapes without compiling its init (the equivalences the
  model tests check hold for any params): norm scales 1 + N(0, std²), other leaves N(0, std²)."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
  rng = np.random.default_rng(seed)

  def fill(path, s):
    x = std * rng.standard_normal(s.shape).astype(np.float32)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      x = x + 1.0
    return jnp.asarray(x, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="session")
def make_params():
  return random_params
