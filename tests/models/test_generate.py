"""generate(): greedy == argmax of the parallel forward, rows independent of padding, sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.models import generate as gen
from seqmix.models import lm

V, D, L, N = 19, 32, 2, 5  # N new tokens
PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9]]


@functools.lru_cache(maxsize=None)
def _setup(name, mixer_kwargs, pos_embedding="none"):
  model = lm.LanguageModel(vocab_size=V, d_model=D, n_layers=L, mixer=name,
                           mixer_kwargs=mixer_kwargs, pos_embedding=pos_embedding, max_len=32)
  # std 0.3 makes the logits far from uniform, so greedy choices are not decided by round-off.
  return model, mt.random_params(model, jnp.zeros((1, 4), jnp.int32), seed=1, std=0.3)


def _key(mixer):
  return mixer[0], lm._freeze(mixer[1])  # pylint: disable=protected-access


@pytest.fixture(params=["none", "learned"])
def setup(request, mixer):
  return _setup(*_key(mixer), pos_embedding=request.param)


def test_greedy_equals_argmax_of_parallel_forward(setup):
  model, params = setup
  out, n = gen.generate(model, params, PROMPTS, max_new_tokens=N, greedy=True)
  assert out.shape == (len(PROMPTS), N) and out.dtype == jnp.int32
  np.testing.assert_array_equal(n, N)
  # Every prompt + continuation, right-padded to one length (causal: padding after a token
  # does not change its logits), in one parallel forward.
  width = max(len(p) for p in PROMPTS) + N
  full = np.zeros((len(PROMPTS), width), np.int32)
  for i, (prompt, row) in enumerate(zip(PROMPTS, np.asarray(out))):
    full[i, :len(prompt) + N] = prompt + row.tolist()
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(full))[0])
  for i, prompt in enumerate(PROMPTS):
    want = logits[i, len(prompt) - 1:len(prompt) + N - 1].argmax(-1)  # prediction after each prefix
    np.testing.assert_array_equal(out[i], want)


def test_rows_of_different_lengths_equal_each_row_alone(setup):
  model, params = setup
  together, _ = gen.generate(model, params, PROMPTS, max_new_tokens=N, greedy=True)
  for prompt, row in zip(PROMPTS, np.asarray(together)):
    alone, _ = gen.generate(model, params, [prompt], max_new_tokens=N, greedy=True, cache_len=16)
    np.testing.assert_array_equal(row, np.asarray(alone)[0])


def test_top_k_1_equals_greedy(mixer):
  model, params = _setup(*_key(mixer))
  greedy, _ = gen.generate(model, params, PROMPTS, max_new_tokens=N, greedy=True)
  top1, _ = gen.generate(model, params, PROMPTS, max_new_tokens=N, rng=jax.random.key(3),
                         top_k=1, temperature=0.7)
  np.testing.assert_array_equal(top1, greedy)


def test_sampling_is_seeded_and_padded_array_input_works(mixer):
  model, params = _setup(*_key(mixer))
  tokens, lengths = gen.left_pad(PROMPTS)
  a, _ = gen.generate(model, params, tokens, lengths=lengths, max_new_tokens=N,
                      rng=jax.random.key(5), top_p=0.9)
  b, _ = gen.generate(model, params, PROMPTS, max_new_tokens=N, rng=jax.random.key(5), top_p=0.9)
  np.testing.assert_array_equal(a, b)
  assert ((0 <= np.asarray(a)) & (np.asarray(a) < V)).all()


def test_eos_stops_a_row(mixer):
  model, params = _setup(*_key(mixer))
  greedy, _ = gen.generate(model, params, PROMPTS, max_new_tokens=N, greedy=True)
  eos = int(greedy[0, 1])  # row 0 emits it at step 1 (maybe earlier in other rows)
  out, n = gen.generate(model, params, PROMPTS, max_new_tokens=N, greedy=True, eos_id=eos)
  out, n, greedy = np.asarray(out), np.asarray(n), np.asarray(greedy)
  for row, length, ref in zip(out, n, greedy):
    hits = np.flatnonzero(ref == eos)
    want = hits[0] + 1 if hits.size else N
    assert length == want
    np.testing.assert_array_equal(row[:want], ref[:want])
    assert (row[want:] == eos).all()


def test_sample_logits_filters():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.broadcast_to(jnp.asarray(probs, jnp.float32), (400, 4)))  # 400 rows
  draw = lambda **kw: set(np.asarray(gen.sample_logits(logits, jax.random.key(0), **kw)).tolist())
  assert draw() == {0, 1, 2, 3}  # P(token 3 missing from 400 draws) = 0.95^400 ≈ 1e-9
  assert draw(top_k=2) == {0, 1}
  assert draw(top_p=0.7) == {0, 1}  # 0.5 < 0.7: token 1 crosses 0.7 and is kept, 2 is not
  assert draw(top_p=0.5) == {0}
  with pytest.raises(ValueError, match="temperature"):
    gen.sample_logits(logits, jax.random.key(0), temperature=0.0)


def test_bad_prompts_say_what_is_wrong(mixer):
  model, params = _setup(*_key(mixer))
  with pytest.raises(ValueError, match="at least one token"):
    gen.generate(model, params, [[1], []], max_new_tokens=2, greedy=True)
  with pytest.raises(ValueError, match="needs `rng`"):
    gen.generate(model, params, [[1]], max_new_tokens=2)
