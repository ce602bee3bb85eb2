"""seqmix.models.segment_recurrent: segment-by-segment runs equal decoding, carry no
information backwards, truncate gradients as asked, reset on packed documents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.models import lm
from seqmix.models import segment_recurrent as sr
from seqmix.testing import assert_rel_close

B, T, L = 2, 12, 4


@pytest.fixture(scope="module")
def gla_mixer():
  module = mt.build("gla")
  return module, mt.init_params(module)


@pytest.fixture(scope="module")
def mha_model():
  model = lm.LanguageModel(vocab_size=16, d_model=32, n_layers=2, mixer="mha",
                           mixer_kwargs={"mha": {"num_heads": 4}})
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (B, T)), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  return model, params, tokens


def _run(module, params, x, **kw):
  return sr.run_segments(module, {"params": params}, x, segment_len=L, **kw)


def test_segments_equal_token_decoding_and_parallel_for_a_mixer(gla_mixer):
  module, params = gla_mixer
  x = mt.random_inputs(0, B, T)
  runner = mt.Runner(module, params)
  y_seg, cache = jax.jit(lambda p, x_: _run(module, p, x_))(params, x)
  assert_rel_close(y_seg, runner.decode(x), 1e-5, "segments vs token-by-token decode")
  assert_rel_close(y_seg, runner(x)[0], 1e-5, "segments vs parallel")
  # The final memory is the decode cache after all T tokens.
  _, cache_split = runner(x, cache=module.init_cache(B, T))
  assert_rel_close(cache.state, cache_split.state, 1e-5, "final memory")


def test_segments_equal_decoding_for_a_language_model(mha_model):
  model, params, tokens = mha_model
  logits_seg, _ = _run(model, params, tokens)
  cache = model.init_cache(B, T)
  steps = []
  for i in range(T):
    lg, cache = model.apply({"params": params}, tokens[:, i:i + 1], cache=cache)
    steps.append(lg)
  assert_rel_close(logits_seg, jnp.concatenate(steps, axis=1), 1e-5, "segments vs decode")
  assert_rel_close(logits_seg, model.apply({"params": params}, tokens)[0], 1e-5,
                   "segments vs parallel")


def test_no_information_flows_to_earlier_segments(gla_mixer):
  module, params = gla_mixer
  x = mt.random_inputs(1, B, T)
  run = jax.jit(lambda x_: _run(module, params, x_)[0])
  # Perturbation: changing segment 3 leaves segments 1-2 bit-identical.
  x2 = x.at[:, 2 * L:].add(1.0)
  y, y2 = np.asarray(run(x)), np.asarray(run(x2))
  np.testing.assert_array_equal(y[:, :2 * L], y2[:, :2 * L])
  assert np.abs(y[:, 2 * L:] - y2[:, 2 * L:]).max() > 1e-3  # the perturbation does reach it
  # Gradient: segment-2 outputs do not depend on segment-3 inputs, and do on segment 1.
  w = mt.random_inputs(2, B, L)
  g = np.asarray(jax.grad(lambda x_: jnp.sum(run(x_)[:, L:2 * L] * w))(x))
  assert np.all(g[:, 2 * L:] == 0)
  assert np.abs(g[:, :L]).max() > 0


@pytest.mark.parametrize("tbptt", [None, 1, pytest.param(2, marks=pytest.mark.slow)])
def test_tbptt_truncates_gradients_to_earlier_segments(gla_mixer, tbptt):
  module, params = gla_mixer
  x = mt.random_inputs(3, B, T)
  w = mt.random_inputs(4, B, L)
  # A loss on the last segment (index 2): gradients reach segment s < 2 only when no
  # truncation boundary lies in (s, 2], i.e. k = None/0, or floor(s/k) == floor(2/k).
  loss = lambda x_: jnp.sum(_run(module, params, x_, tbptt=tbptt)[0][:, 2 * L:] * w)
  g = np.asarray(jax.jit(jax.grad(loss))(x))
  for s in range(3):
    reach = np.abs(g[:, s * L:(s + 1) * L]).max()
    expect = (not tbptt) or (s // tbptt == 2 // tbptt)
    assert (reach > 0) == expect, (tbptt, s, reach)


@pytest.mark.slow
def test_tbptt_also_truncates_parameter_gradients_through_memory(gla_mixer):
  """k = 1: the loss on segment 2 is that of segment 2 run from a constant memory."""
  module, params = gla_mixer
  x = mt.random_inputs(5, B, T)
  w = mt.random_inputs(6, B, L)

  def loss_k1(p):
    return jnp.sum(_run(module, p, x, tbptt=1)[0][:, 2 * L:] * w)

  def loss_const_memory(p):
    _, mem = module.apply({"params": params}, x[:, :2 * L], cache=module.init_cache(B, T))
    y, _ = module.apply({"params": p}, x[:, 2 * L:], cache=mem)
    return jnp.sum(y * w)

  g1, g2 = jax.jit(jax.grad(loss_k1))(params), jax.jit(jax.grad(loss_const_memory))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert_rel_close(a, b, 1e-5, "k=1 grads vs constant memory")
  g_full = jax.jit(jax.grad(lambda p: jnp.sum(_run(module, p, x)[0][:, 2 * L:] * w)))(params)
  diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1),
                                                          jax.tree.leaves(g_full)))
  assert diff > 1e-6, "full BPTT parameter gradients equal k=1 ones: memory carries nothing"


def test_packed_documents_reset_the_memory(gla_mixer):
  """A document starting inside segment 2 (at t = 6) gives the outputs it gives alone."""
  module, params = gla_mixer
  x = mt.random_inputs(7, B, T)
  first = 6
  seg, pos = mt.packed_pair(x, first)
  run = jax.jit(lambda x_, s, p: _run(module, params, x_, segment_ids=s, positions=p)[0])
  runner = mt.Runner(module, params)
  y = run(x, seg, pos)
  y_alone = runner(x[:, first:], positions=pos[:, first:])[0]
  assert_rel_close(y[:, first:], y_alone, 1e-5, "packed doc 2 vs alone")
  # A boundary exactly between segments (t = 8) too.
  seg, pos = mt.packed_pair(x, 2 * L)
  y = run(x, seg, pos)
  y_alone = runner(x[:, 2 * L:], positions=pos[:, 2 * L:])[0]
  assert_rel_close(y[:, 2 * L:], y_alone, 1e-5, "doc 2 at a segment boundary vs alone")


@pytest.mark.parametrize("segment_len, tbptt, match", [
    (5, None, r"T=12 is not a multiple of segment_len=5; pad the sequence to 15"),
    (0, None, r"segment_len=0 must be a positive int"),
    (4.0, None, r"segment_len=4.0 must be a positive int"),
    (4, -1, r"tbptt=-1 must be None or 0"),
])
def test_bad_segmentation_raises(gla_mixer, segment_len, tbptt, match):
  module, params = gla_mixer
  with pytest.raises(ValueError, match=match):
    sr.run_segments(module, {"params": params}, mt.random_inputs(0, B, T),
                    segment_len=segment_len, tbptt=tbptt)
