"""LanguageModel(logit_positions=...) equals the full logits gathered at those positions."""

import jax
import jax.numpy as jnp
import numpy as np

from seqmix.models import lm


def test_logit_positions_gather_full_logits():
  model = lm.LanguageModel(vocab_size=11, d_model=16, n_layers=1, mixer="mha",
                           mixer_kwargs={"mha": {"num_heads": 2}}, mlp="none")
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 11)
  params = model.init(jax.random.PRNGKey(1), tokens)["params"]
  full, _ = model.apply({"params": params}, tokens)
  pos = jnp.array([[0, 8, 3], [5, 5, 1]])
  part, _ = model.apply({"params": params}, tokens, logit_positions=pos)
  assert part.shape == (2, 3, 11)
  np.testing.assert_allclose(part, jnp.take_along_axis(full, pos[..., None], axis=1),
                             rtol=1e-6, atol=1e-6)
