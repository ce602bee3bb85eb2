"""Multi-query associative recall (MQAR), generated as zoology's `multiquery_ar` does.

Zoology: Arora, Eyuboglu et al. 2023, "Zoology: Measuring and Improving Recall in Efficient
Language Models" (arXiv:2312.04927). Per example, with vocab V, length T and P = num_kv_pairs:

1. keys: P distinct ids from [1, V/2); values: P distinct ids from [V/2, V).
2. The prefix `k_1 v_1 k_2 v_2 ... k_P v_P` fills positions [0, 2P).
3. The remaining T - 2P positions hold `space = (T - 2P) // 2` query slots (every other
   position). P distinct slots `g_1..g_P` are drawn without replacement with probability
   `∝ i^(power_a - 1)` for slot `i = 1..space` (a power law: short gaps are likely);
   key `k_j` is placed at position `2P + 2 g_j`.
4. `targets` is -100 everywhere except at each query position, where it is the queried key's
   value (the model reads `k_j` and must emit `v_j`): exactly P scored positions per example.
5. With `random_non_queries` (zoology's default) every remaining 0 of the inputs (the unused
   query-region positions) is replaced by a uniform random id in [0, V).

The numpy calls are zoology's, in zoology's order, on a `np.random.RandomState(seed)`, so
inputs and targets match zoology's for the same seed except the step-5 filler, which zoology
draws with torch and we draw with the same RandomState. Train and test sets use seeds `seed`
and `seed + 10`, as zoology. Zoology's checks hold: T even, V > T, 4P <= T.
"""

from __future__ import annotations

import dataclasses
import math

import grain
import jax.numpy as jnp
import numpy as np

from seqmix.data.common import IGNORE, process_rows


@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """Zoology's MQAR options (its defaults for power_a and random_non_queries)."""

  vocab_size: int = 8192  # V; keys [1, V/2), values [V/2, V)
  seq_len: int = 64  # T (input_seq_len), even
  num_kv_pairs: int = 8  # P
  power_a: float = 0.01  # query-gap power law exponent; 1.0 = uniform slots
  random_non_queries: bool = True  # fill non-query slots with random tokens

  def validate(self) -> None:
    if self.seq_len % 2:
      raise ValueError(f"MQAR seq_len must be even (zoology), got {self.seq_len}.")
    if self.vocab_size <= self.seq_len:
      raise ValueError(f"MQAR needs vocab_size > seq_len (zoology), got vocab_size="
                       f"{self.vocab_size}, seq_len={self.seq_len}.")
    if 4 * self.num_kv_pairs > self.seq_len:
      raise ValueError(f"MQAR needs 4 * num_kv_pairs <= seq_len (zoology), got num_kv_pairs="
                       f"{self.num_kv_pairs}, seq_len={self.seq_len}.")
    if self.num_kv_pairs > self.vocab_size // 2 - 1:
      raise ValueError(f"num_kv_pairs={self.num_kv_pairs} distinct keys need vocab_size >= "
                       f"{2 * self.num_kv_pairs + 2}.")


def query_slot_probs(space: int, power_a: float) -> np.ndarray:
  """`[space]` probabilities of query slots 0..space-1: `∝ (i+1)^(power_a - 1)`."""
  p = power_a * np.arange(1, space + 1) ** (power_a - 1)
  return p / p.sum()


def generate_mqar(cfg: MQARConfig, num_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`num_examples` MQAR examples -> (inputs, targets), int32 `[num_examples, T]`."""
  cfg.validate()
  rng = np.random.RandomState(seed)
  n, t, pairs = num_examples, cfg.seq_len, cfg.num_kv_pairs
  context = 2 * pairs
  half = cfg.vocab_size // 2
  key_choices = np.arange(1, half)
  value_choices = np.arange(half, cfg.vocab_size)
  # Row by row in zoology's order (all keys, then all values, then all slots): same RNG stream.
  keys = np.stack([rng.choice(key_choices, replace=False, size=pairs) for _ in range(n)])  # [n, P]
  values = np.stack([rng.choice(value_choices, replace=False, size=pairs) for _ in range(n)])

  kvs = np.zeros((n, context), np.int64)  # [n, 2P]: k v k v ...
  kvs[:, 0::2] = keys
  kvs[:, 1::2] = values

  space = (t - context) // 2
  p = query_slot_probs(space, cfg.power_a)
  slots = np.arange(space)
  gaps = np.stack([rng.choice(slots, replace=False, p=p, size=pairs) for _ in range(n)])  # [n, P]

  # One extra position so inputs/targets come out as a shift by one, as zoology builds them.
  queries = np.zeros((n, t - context + 1), np.int64)  # [n, T - 2P + 1]
  np.put_along_axis(queries, 2 * gaps, keys, axis=1)
  examples = np.concatenate([kvs, queries], axis=1)  # [n, T + 1]
  labels = np.full((n, t + 1), IGNORE, np.int64)
  np.put_along_axis(labels, 2 * gaps + context + 1, values, axis=1)
  inputs, targets = examples[:, :-1], labels[:, 1:]  # [n, T] each

  if cfg.random_non_queries:
    filler = rng.randint(cfg.vocab_size, size=inputs.shape)
    inputs = np.where(inputs == 0, filler, inputs)
  return inputs.astype(np.int32), targets.astype(np.int32)


class _Examples:
  """Random-access source of `{"inputs", "targets"}` rows for grain."""

  def __init__(self, inputs: np.ndarray, targets: np.ndarray):
    self.inputs, self.targets = inputs, targets

  def __len__(self) -> int:
    return len(self.inputs)

  def __getitem__(self, i):
    return {"inputs": self.inputs[i], "targets": self.targets[i]}


def mqar_dataset(cfg: MQARConfig, num_examples: int, seed: int) -> grain.MapDataset:
  """The fixed set of `num_examples` examples for `seed`, as a grain MapDataset of rows `[T]`."""
  return grain.MapDataset.source(_Examples(*generate_mqar(cfg, num_examples, seed)))


def mqar_train(cfg: MQARConfig, *, num_examples: int, batch_size: int, seed: int,
               process_index: int | None = None,
               process_count: int | None = None) -> grain.MapDataset:
  """Infinite batches of the training set (seed `seed`), re-shuffled every epoch.

  Each process gets `batch_size // process_count` rows of each global batch (disjoint).
  """
  p, count, rows = process_rows(batch_size, process_index, process_count)
  ds = mqar_dataset(cfg, num_examples, seed).shuffle(seed=seed).repeat(None)
  return ds[p::count].batch(rows, drop_remainder=True)


def mqar_test(cfg: MQARConfig, *, num_examples: int, batch_size: int, seed: int,
              process_index: int | None = None,
              process_count: int | None = None) -> grain.MapDataset:
  """All test examples (seed `seed + 10`, as zoology) once, in order, in fixed-shape batches.

  The last batch is padded with all -100 rows; `mqar_accuracy` leaves them out of the mean.
  Global batch `j` holds examples `[jB, (j+1)B)`; process `p` gets the `p`-th block of it.
  """
  p, _, rows = process_rows(batch_size, process_index, process_count)
  inputs, targets = generate_mqar(cfg, num_examples, seed + 10)
  num_batches = math.ceil(num_examples / batch_size)

  def row(local: int):
    g = (local // rows) * batch_size + p * rows + local % rows
    if g < num_examples:
      return {"inputs": inputs[g], "targets": targets[g]}
    return {"inputs": np.zeros(cfg.seq_len, np.int32),
            "targets": np.full(cfg.seq_len, IGNORE, np.int32)}

  return grain.MapDataset.range(num_batches * rows).map(row).batch(rows)


def mqar_accuracy(logits_or_preds, targets):
  """Per-example and mean accuracy over the scored positions (`targets != -100`).

  Args:
    logits_or_preds: logits `[B,T,Vo]` (argmax taken) or predicted ids `[B,T]`.
    targets: int `[B,T]`.

  Returns:
    (per_example `[B]` float32, NaN for rows with no scored position such as padding rows;
     mean over the rows that have scored positions). With zoology's data every row has exactly
    num_kv_pairs scored positions, so this mean equals zoology's mean over scored tokens.
    Works under jit (jnp).
  """
  preds = logits_or_preds
  if preds.ndim == targets.ndim + 1:
    preds = jnp.argmax(preds, axis=-1)
  scored = targets != IGNORE  # [B, T]
  correct = jnp.sum((preds == targets) & scored, axis=-1)  # [B]
  count = jnp.sum(scored, axis=-1)  # [B]
  per_example = jnp.where(count > 0, correct / jnp.maximum(count, 1), jnp.nan)
  has = count > 0
  mean = jnp.sum(jnp.where(has, per_example, 0.0)) / jnp.maximum(jnp.sum(has), 1)
  return per_example.astype(jnp.float32), mean.astype(jnp.float32)


# The Based paper's MQAR mix (train), as (T, pairs, examples): zoology's multi-segment training
# (`train_configs`) of Arora et al. 2024, "Simple linear attention language models balance the
# recall-throughput tradeoff" (Based, arXiv:2402.18668). The list is from our reading of that
# setup, not checked line by line against its config file: pass `segments` to change it.
BASED_TRAIN_SEGMENTS = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000),
                        (256, 32, 20_000), (256, 64, 20_000))
BASED_TEST_SEGMENTS = ((64, 4, 1_000), (64, 8, 1_000), (64, 16, 1_000), (128, 32, 1_000),
                       (256, 64, 1_000))


def generate_mqar_mixed(segments, *, vocab_size: int = 8192, seed: int, power_a: float = 0.01,
                        random_non_queries: bool = True, seq_len: int | None = None):
  """The Based-paper MQAR variant: several (T, pairs) settings in one shuffled set.

  Each segment `(T_i, P_i, n_i)` is `generate_mqar(MQARConfig(V, T_i, P_i, power_a,
  random_non_queries), n_i, seed=1000 * seed + i)` (zoology's generator, random filler on by
  default as in the Based paper). Rows shorter than `seq_len` (default: the longest T_i) are
  padded on the right with token 0 and target -100: a causal model never sees the padding
  from a scored position, so padding changes no prediction. The rows are then shuffled by
  `np.random.RandomState(seed)`. Every row keeps zoology's invariants (each key queried once,
  exactly P_i scored positions).

  Returns:
    (inputs [N, T] int32, targets [N, T] int32, lengths [N] int32 (each row's own T_i),
     pairs [N] int32 (each row's P_i)), N = sum n_i, T = seq_len.
  """
  segments = [tuple(int(v) for v in s) for s in segments]
  if not segments:
    raise ValueError("segments is empty; give (seq_len, num_kv_pairs, num_examples) triples.")
  t_max = max(s[0] for s in segments) if seq_len is None else int(seq_len)
  if any(s[0] > t_max for s in segments):
    raise ValueError(f"seq_len={t_max} is shorter than a segment's T: {segments}.")
  xs, ys, lens, pairs = [], [], [], []
  for i, (t, p, n) in enumerate(segments):
    cfg = MQARConfig(vocab_size=vocab_size, seq_len=t, num_kv_pairs=p, power_a=power_a,
                     random_non_queries=random_non_queries)
    x, y = generate_mqar(cfg, n, 1000 * int(seed) + i)
    xs.append(np.pad(x, ((0, 0), (0, t_max - t))))
    ys.append(np.pad(y, ((0, 0), (0, t_max - t)), constant_values=IGNORE))
    lens.append(np.full(n, t, np.int32))
    pairs.append(np.full(n, p, np.int32))
  order = np.random.RandomState(seed).permutation(sum(s[2] for s in segments))
  return tuple(np.concatenate(a)[order].astype(np.int32) for a in (xs, ys, lens, pairs))
