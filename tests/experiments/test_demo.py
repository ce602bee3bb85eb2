"""experiments/demo.py: its mixers exist and its configs build models (training is `make demo`)."""

import jax
import jax.numpy as jnp
import pytest

from experiments import demo
from seqmix import registry
from seqmix.train import loop
from seqmix.train.config import validate


def test_demo_mixers_are_registered():
  missing = [m for m in demo.DEMO_MIXERS if m not in registry.names()]
  assert not missing, f"DEMO_MIXERS names unregistered mixers: {missing}"


@pytest.mark.parametrize("mixer", demo.DEMO_MIXERS)
def test_demo_mqar_config_builds(mixer):
  cfg = demo.mqar_demo_config(mixer)
  validate(cfg)
  model = loop.build_model(cfg.model, cfg.data.vocab_size)
  x = jnp.zeros((2, cfg.train.seq_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  logits = jax.eval_shape(lambda p: model.apply(p, x)[0], shapes)
  assert logits.shape == (2, cfg.train.seq_len, cfg.data.vocab_size)
