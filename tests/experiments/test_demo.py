"""experiments/demo.py: its mixers exist, its sweep cells build models (training: `make demo`)."""

import jax
import jax.numpy as jnp
import pytest

from experiments import demo
from experiments import sweep
from seqmix import registry


def test_demo_mixers_are_registered():
  missing = [m for m in demo.DEMO_MIXERS if m not in registry.names()]
  assert not missing, f"DEMO_MIXERS names unregistered mixers: {missing}"


@pytest.mark.parametrize("mixer", demo.DEMO_MIXERS)
def test_demo_mqar_cells_build(mixer):
  cells = demo.demo_cells([mixer])
  assert len(cells) == len(demo.DEMO_D_MODELS)
  for cell in cells:
    model = sweep.build_model(cell, 256)
    x = jnp.zeros((2, cell.seq_len), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    logits = jax.eval_shape(lambda p: model.apply(p, x)[0], shapes)
    assert logits.shape == (2, cell.seq_len, 256)
