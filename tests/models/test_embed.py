"""seqmix.models.embed: the lookup's gradient against a float64 numpy accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.models import embed


def _grad_numpy(ids, g, v):
  """Sum of g's rows into the table rows their ids name, in float64; ids out of range drop."""
  out = np.zeros((v, g.shape[-1]))
  for i, row in zip(ids.reshape(-1), g.reshape(-1, g.shape[-1]).astype(np.float64)):
    if 0 <= i < v:
      out[i] += row
  return out


# Skewed ids (one row takes most tokens, as a space does in text) and a row never used.
@pytest.mark.parametrize("one_hot", [True, False], ids=["one_hot", "scatter"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lookup_forward_and_gradient(one_hot, dtype, monkeypatch):
  v, d = 13, 6
  monkeypatch.setattr(embed, "ONE_HOT_MAX_VOCAB", v if one_hot else v - 1)
  rng = np.random.default_rng(0)
  table = rng.standard_normal((v, d)).astype(np.float32)
  ids = np.where(rng.random((3, 17)) < 0.6, 4, rng.integers(0, v - 1, (3, 17))).astype(np.int32)
  g = rng.standard_normal((3, 17, d)).astype(np.float32)

  def loss(tab):
    rows = embed.lookup(tab, jnp.asarray(ids)).astype(dtype)  # [3, 17, d]
    return jnp.sum(rows.astype(jnp.float32) * g)

  np.testing.assert_array_equal(embed.lookup(table, ids), table[ids])
  grad = jax.jit(jax.grad(loss))(table)
  assert grad.dtype == jnp.float32
  # The cotangent of the bf16 rows is bf16 (the model's own rounding); the sum over the ~30
  # tokens of row 4 is float32: a bfloat16 accumulation would be ~1e-2 off here.
  g_seen = np.asarray(jnp.asarray(g, dtype).astype(jnp.float32))
  np.testing.assert_allclose(grad, _grad_numpy(ids, g_seen, v), rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(grad[v - 1], 0.0)  # the unused row


def test_lookup_out_of_range_ids_have_nan_rows_and_no_gradient():
  table = np.ones((5, 2), np.float32)
  ids = np.array([1, 7], np.int32)
  assert np.isnan(np.asarray(embed.lookup(table, ids))[1]).all()
  grad = jax.grad(lambda t: jnp.nansum(embed.lookup(t, ids)))(table)
  np.testing.assert_array_equal(grad, _grad_numpy(ids, np.ones((2, 2), np.float32), 5))


def test_embed_module_keeps_flax_embed_params_and_attend():
  import flax.linen as nn
  ids = jnp.array([[0, 3, 3]])
  ours = embed.Embed(4, 8, dtype=jnp.bfloat16)
  theirs = nn.Embed(4, 8, dtype=jnp.bfloat16)
  params = theirs.init(jax.random.key(0), ids)
  np.testing.assert_array_equal(ours.apply(params, ids), theirs.apply(params, ids))
  assert ours.apply(params, ids).dtype == jnp.bfloat16
  q = jnp.ones((2, 8))
  np.testing.assert_array_equal(ours.apply(params, q, method="attend"),
                                theirs.apply(params, q, method="attend"))
  with pytest.raises(ValueError, match="must be integers"):
    ours.apply(params, q)
