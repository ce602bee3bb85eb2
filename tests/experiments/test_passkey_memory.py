"""experiments/passkey_memory: every model of the comparison builds and runs segment by
segment, equal to its parallel form where one exists."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import passkey_memory
from seqmix.models import segment_recurrent as sr
from seqmix.testing import assert_rel_close

MODELS = ["mha_window", "transformer_xl", "infini_attention", "memorizing", "landmark", "rmt"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n != "transformer_xl"
                                  else n for n in MODELS])
def test_model_runs_segment_recurrently(name):
  model = passkey_memory.build(name, seg_len=8, memory_size=8, memory_tokens=2, d=32, heads=2,
                               block_len=4)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens[:, :8])["params"]
  y, _ = jax.jit(lambda p: sr.run_segments(model, {"params": p}, tokens, segment_len=8))(params)
  assert y.shape == (2, 24, 256) and np.all(np.isfinite(np.asarray(y)))
  if name != "rmt":
    assert_rel_close(y, jax.jit(model.apply)({"params": params}, tokens)[0], 1e-5,
                     "segments vs parallel")


def test_unknown_model_raises():
  with pytest.raises(ValueError, match="unknown model 'xl'"):
    passkey_memory.build("xl", 8, 8, 2, 32, 2)
