"""Fixtures of the model tests: the attention mixer (`mha`) once it is registered, and the
toy shift mixer (`seqmix.mixers.testing.ToyShiftMixer`) registered as "toy" per test module,
which makes a second, constant-state mixer for hybrid patterns."""

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

