"""Seeded synthetic recall tasks: selective copying, induction heads, passkey retrieval.

Every task is a random-access source for grain (`len`, `__getitem__`): row `i` of the stream
`seed` is a function of `(seed, i)` only (`np.random.default_rng([seed, i])`), so a dataset is
deterministic given its seed, independent of sharding and of the order rows are read in.
Rows are dicts of int32 numpy arrays `inputs [T]`, `targets [T]` (`-100` = not scored), plus
task metadata. The next-token convention is the library's: the target at position `t` is what
the model must emit after reading `inputs[: t + 1]`.

    src = InductionHeads(seq_len=256, num_examples=10_000, seed=0)
    ds = grain.MapDataset.source(src).batch(32)       # or src.arrays() -> (inputs, targets)

Definitions (the paper each comes from is cited in the class docstring):

- `SelectiveCopying` (Gu & Dao 2023, Mamba, arXiv:2312.00752, §3.1 and App. E.1).
- `InductionHeads` (Olsson et al. 2022; the synthetic form of Fu et al. 2023, H3,
  arXiv:2212.14052, as Mamba App. E.1.2 uses it: train at T=256, test 64 ... 2^20).
- `PasskeyRetrieval` (Mohtashami & Jaggi 2023, Landmark Attention, arXiv:2305.16300, App. B).
"""

from __future__ import annotations

import numpy as np

from seqmix.data.common import IGNORE


class SeededSource:
  """Base of the tasks here: `num_examples` rows, row `i` drawn from `default_rng([seed, i])`.

  Subclasses set `seq_len` and `vocab_size` (the model's vocabulary: every id is below it) and
  implement `example(rng) -> dict of numpy arrays`.
  """

  seq_len: int
  vocab_size: int

  def __init__(self, num_examples: int, seed: int):
    if num_examples < 0:
      raise ValueError(f"num_examples={num_examples} must be >= 0.")
    self.num_examples, self.seed = int(num_examples), int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"row {index} of a source with {self.num_examples} rows")
    return self.example(np.random.default_rng([self.seed, index]))

  def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """All rows stacked: (inputs, targets), int32 `[N, T]` (for in-memory training loops)."""
    rows = [self[i] for i in range(self.num_examples)]
    return (np.stack([r["inputs"] for r in rows]).astype(np.int32),
            np.stack([r["targets"] for r in rows]).astype(np.int32))


class SelectiveCopying(SeededSource):
  """Selective copying (Mamba, Gu & Dao 2023, §3.1, Fig. 2 and App. E.1).

  The paper's setting: sequences of length 4096, a vocabulary of 16 tokens including the noise
  token, 16 data tokens to memorise. Ids: `0` = noise, `1 .. V-1` = data tokens (V =
  `num_tokens`, 16, noise included as in the paper), `V` = the "copy now" marker (one more id,
  so the model's vocabulary is V + 1). With T = `seq_len` and n = `num_data`:

  - positions `[0, T - n)`: noise everywhere except n distinct positions, drawn uniformly
    without replacement and sorted, which hold n data tokens drawn uniformly (with
    replacement) from `[1, V)`;
  - positions `[T - n, T)`: the marker; `targets[T - n + j]` = the j-th data token in order of
    position; every other target is -100 (exactly n scored positions).

  The gaps between data tokens are random, so a time-invariant model (a fixed convolution)
  cannot solve it; content-aware selection can. Row metadata: `data_positions [n]`.
  """

  def __init__(self, *, seq_len: int = 4096, num_examples: int, seed: int, num_data: int = 16,
               num_tokens: int = 16):
    super().__init__(num_examples, seed)
    if num_tokens < 2:
      raise ValueError(f"num_tokens={num_tokens}: need the noise token and >= 1 data token.")
    if seq_len < 2 * num_data:
      raise ValueError(f"seq_len={seq_len} must be >= 2 * num_data={2 * num_data} (n data "
                       "positions in the context plus n answer positions).")
    self.seq_len, self.num_data, self.num_tokens = int(seq_len), int(num_data), int(num_tokens)
    self.noise, self.marker = 0, self.num_tokens
    self.vocab_size = self.num_tokens + 1

  def example(self, rng):
    t, n = self.seq_len, self.num_data
    context = t - n
    positions = np.sort(rng.choice(context, size=n, replace=False))
    data = rng.integers(1, self.num_tokens, size=n)
    inputs = np.full(t, self.noise, np.int32)
    inputs[positions] = data
    inputs[context:] = self.marker
    targets = np.full(t, IGNORE, np.int32)
    targets[context:] = data
    return {"inputs": inputs, "targets": targets, "data_positions": positions.astype(np.int32)}


class InductionHeads(SeededSource):
  """Induction heads (Olsson et al. 2022) as the synthetic task of H3 (Fu et al. 2023) and
  Mamba (App. E.1.2: vocabulary 16, train at T = 256, test at 2^6 ... 2^20).

  Ids `0 .. V-1` are ordinary tokens (V = `num_tokens`), `V` is the special token S (model
  vocabulary V + 1). A row of length T: uniform tokens from `[0, V)`; at a position `p` drawn
  uniformly from `[0, T - 3]` the pair `S M` (M uniform in `[0, V)`) is written at `p, p + 1`;
  the last input is S again. Only the last position is scored: `targets[T - 1] = M`. S occurs
  exactly twice (at p and T - 1), so "find the previous S, copy the token after it" solves the
  task at any length; p is uniform, so the gap ranges over the whole context. Row metadata:
  `trigger_position` (p) and `answer` (M).
  """

  def __init__(self, *, seq_len: int = 256, num_examples: int, seed: int, num_tokens: int = 16):
    super().__init__(num_examples, seed)
    if seq_len < 4:
      raise ValueError(f"seq_len={seq_len} must be >= 4 (S M, one filler, the final S).")
    if num_tokens < 2:
      raise ValueError(f"num_tokens={num_tokens} must be >= 2.")
    self.seq_len, self.num_tokens = int(seq_len), int(num_tokens)
    self.special = self.num_tokens
    self.vocab_size = self.num_tokens + 1

  def example(self, rng):
    t = self.seq_len
    inputs = rng.integers(0, self.num_tokens, size=t).astype(np.int32)
    p = int(rng.integers(0, t - 2))  # [0, T-3]: M at p + 1 <= T - 2 precedes the final S
    answer = int(rng.integers(0, self.num_tokens))
    inputs[p], inputs[p + 1], inputs[t - 1] = self.special, answer, self.special
    targets = np.full(t, IGNORE, np.int32)
    targets[t - 1] = answer
    return {"inputs": inputs, "targets": targets,
            "trigger_position": np.int32(p), "answer": np.int32(answer)}


PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the important information there. ")
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                  "back again. ")
PASSKEY_QUESTION = "What is the pass key? The pass key is "


def passkey_line(key: str) -> str:
  return f"The pass key is {key}. Remember it. {key} is the pass key. "


class PasskeyRetrieval(SeededSource):
  """Passkey retrieval (Mohtashami & Jaggi 2023, Landmark Attention, App. B), byte-level.

  The text is the paper's prompt: `PASSKEY_INTRO`, then `PASSKEY_FILLER` repeated, with
  `passkey_line(key)` inserted at a sentence boundary of the filler, then `PASSKEY_QUESTION`
  and the key. The key is a `num_digits`-digit decimal number (leading digit 1-9, uniform; the
  paper draws integers up to 50,000; a fixed width makes every row's answer the same length).
  Tokens are UTF-8 bytes (ids `[0, 256)`, the `byte` tokenizer's), so the model's vocabulary
  is 256. The whole string has exactly T + 1 bytes: the filler is cut to fit (the part after
  the key line may end mid-sentence, before the question); `inputs` are bytes `[0, T)`,
  `targets` bytes `[1, T]` scored only where the next byte is a digit of the answer (the last
  `num_digits` positions). The insertion depth is uniform over the filler's sentence
  boundaries (`depth` in [0, 1] is the fraction of filler before the key line). Row metadata:
  `key_position` (offset of the key's first digit in `inputs`), `key` (the number), `depth`.
  T ranges over 1k ... 32k in the usual evaluation; T must leave room for one filler sentence.
  """

  def __init__(self, *, seq_len: int = 1024, num_examples: int, seed: int, num_digits: int = 5):
    super().__init__(num_examples, seed)
    if num_digits < 1:
      raise ValueError(f"num_digits={num_digits} must be >= 1.")
    self.seq_len, self.num_digits = int(seq_len), int(num_digits)
    fixed = (len(PASSKEY_INTRO) + len(passkey_line("0" * num_digits)) + len(PASSKEY_QUESTION)
             + num_digits)
    self.filler_len = self.seq_len + 1 - fixed
    if self.filler_len < len(PASSKEY_FILLER):
      raise ValueError(f"seq_len={seq_len} is too short for the passkey prompt: it needs at "
                       f"least {fixed + len(PASSKEY_FILLER) - 1} bytes.")
    self.vocab_size = 256

  def example(self, rng):
    lo = 10 ** (self.num_digits - 1)
    key = str(int(rng.integers(lo, 10 * lo)))
    n_boundaries = self.filler_len // len(PASSKEY_FILLER)  # sentence groups that fit whole
    before = int(rng.integers(0, n_boundaries + 1))
    head = PASSKEY_FILLER * before
    line = passkey_line(key)
    tail_len = self.filler_len - len(head)
    tail = (PASSKEY_FILLER * (tail_len // len(PASSKEY_FILLER) + 1))[:tail_len]
    text = PASSKEY_INTRO + head + line + tail + PASSKEY_QUESTION + key
    data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)  # [T + 1]
    assert data.shape[0] == self.seq_len + 1, (data.shape, self.seq_len)
    inputs, targets = data[:-1].copy(), data[1:].copy()
    targets[: self.seq_len - self.num_digits] = IGNORE
    key_position = len(PASSKEY_INTRO) + len(head) + len("The pass key is ")
    return {"inputs": inputs, "targets": targets, "key_position": np.int32(key_position),
            "key": np.int32(int(key)),
            "depth": np.float32(len(head) / max(1, self.filler_len))}
