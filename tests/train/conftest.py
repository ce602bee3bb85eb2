"""Tiny stand-ins shared by the training tests: a causal LM with the LanguageModel
interface (so optimizer/step tests do not depend on any mixer) and a grain copy task."""

import flax.linen as nn
import grain
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.train.loop import DataSplits


class TinyLM(nn.Module):
  """embed -> x + Dense(x shifted by one step) -> LayerNorm -> Dense(vocab, bias).

  Causal (position t sees t and t-1); has a 2-D embedding, kernels, biases and a norm,
  which is what the weight-decay mask tests need.
  """
  vocab_size: int = 16
  d_model: int = 16
  dropout: float = 0.0

  @nn.compact
  def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None,
               deterministic=True):
    del segment_ids, positions
    x = nn.Embed(self.vocab_size, self.d_model, name="embed")(tokens)  # [b, t, d]
    prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]  # [b, t, d], x[t-1]
    x = x + nn.Dense(self.d_model, name="mix")(jnp.concatenate([x, prev], -1))
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = nn.LayerNorm(name="norm")(x)
    return nn.Dense(self.vocab_size, name="head")(x).astype(jnp.float32), cache


def copy_example(seed: int, index: int, *, seq_len: int, vocab: int, lag: int = 1):
  rng = np.random.default_rng([seed, index])
  x = rng.integers(0, vocab, size=seq_len, dtype=np.int32)
  y = np.full(seq_len, -100, np.int32)
  y[lag:] = x[:-lag]
  return {"inputs": x, "targets": y}


def grain_copy_splits(*, seq_len=8, batch_size=4, seed=0, vocab=16, n_val=10):
  """A DataSplits over a lag-1 copy task: grain train iterator (resumable), a validation
  split of n_val examples in batches whose last one is partial."""
  train = (grain.MapDataset.range(1_000_000).shuffle(seed=seed)
           .map(lambda i: copy_example(seed, int(i), seq_len=seq_len, vocab=vocab))
           .batch(batch_size, drop_remainder=True).to_iter_dataset())

  def validation():
    rows = [copy_example(seed + 1, i, seq_len=seq_len, vocab=vocab) for i in range(n_val)]
    for s in range(0, n_val, batch_size):
      chunk = rows[s:s + batch_size]
      yield {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}

  return DataSplits(iter(train), validation, vocab, decode=None)


@pytest.fixture
def tiny_model():
  return TinyLM()
