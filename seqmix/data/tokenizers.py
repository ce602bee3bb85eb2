"""Byte and character tokenizers.

Both map text to int32 token ids `[T]` and back, expose `vocab_size`, and serialise to JSON
(`to_json` / `tokenizer_from_json`) so a prepared token store or a checkpoint can name the
tokenizer it was built with.

- `ByteTokenizer`: the UTF-8 bytes of the text, vocab 256. Needs no fitting.
- `CharTokenizer`: the sorted set of characters of a corpus, as nanoGPT's `shakespeare_char`
  (65 characters for tinyshakespeare). Fit with `CharTokenizer.from_text(corpus)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocab 256; every string round-trips exactly."""

  kind = "byte"
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 `[T]` (T = number of UTF-8 bytes)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """int `[T]` -> str. Ids outside [0, 256) and invalid UTF-8 become U+FFFD (model samples
    need not be valid UTF-8)."""
    ids = np.asarray(ids).reshape(-1)
    valid = (ids >= 0) & (ids < 256)
    # 0xFF never occurs in UTF-8, so it decodes to U+FFFD like any other invalid byte.
    ids = np.where(valid, ids, 0xFF).astype(np.uint8)
    return ids.tobytes().decode("utf-8", errors="replace")

  def to_json(self) -> str:
    return json.dumps({"type": self.kind})

  @classmethod
  def from_json(cls, text: str) -> ByteTokenizer:
    _check_type(json.loads(text), cls.kind)
    return cls()

  def __eq__(self, other) -> bool:
    return isinstance(other, ByteTokenizer)

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class CharTokenizer:
  """Characters as tokens; id = rank of the character in the sorted vocabulary."""

  kind = "char"

  def __init__(self, chars: Sequence[str]):
    """Args: chars: the vocabulary, distinct single characters (sorted here)."""
    chars = sorted(chars)
    if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
      raise ValueError(f"CharTokenizer needs distinct single characters, got {chars!r}.")
    self.chars = tuple(chars)
    self._stoi = {c: i for i, c in enumerate(self.chars)}
    # Vectorised lookup for the common case of code points below 2**16.
    self._table = np.full(1 << 16, -1, dtype=np.int32)
    for c, i in self._stoi.items():
      if ord(c) < (1 << 16):
        self._table[ord(c)] = i

  @classmethod
  def from_text(cls, text: str) -> CharTokenizer:
    """The vocabulary of `text` (sorted set of its characters)."""
    if not text:
      raise ValueError("CharTokenizer.from_text needs a non-empty text to take characters from.")
    return cls(sorted(set(text)))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 `[T]` (T = number of characters). Unknown characters raise ValueError."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    if codes.size and codes.max() < (1 << 16):
      ids = self._table[codes]
    else:
      ids = np.array([self._stoi.get(c, -1) for c in text], dtype=np.int32)
    if (ids < 0).any():
      unknown = sorted({c for c in text if c not in self._stoi})
      raise ValueError(
          f"CharTokenizer: characters {unknown[:10]!r} are not in the vocabulary of "
          f"{self.vocab_size} characters; fit the tokenizer on a text that contains them "
          "(CharTokenizer.from_text) or use the byte tokenizer.")
    return ids.astype(np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """int `[T]` -> str. Ids outside the vocabulary become U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    n = len(self.chars)
    return "".join(self.chars[i] if 0 <= i < n else "\ufffd" for i in ids.tolist())

  def to_json(self) -> str:
    return json.dumps({"type": self.kind, "chars": "".join(self.chars)})

  @classmethod
  def from_json(cls, text: str) -> CharTokenizer:
    obj = json.loads(text)
    _check_type(obj, cls.kind)
    return cls(list(obj["chars"]))

  def __eq__(self, other) -> bool:
    return isinstance(other, CharTokenizer) and other.chars == self.chars

  def __repr__(self) -> str:
    return f"CharTokenizer(vocab_size={self.vocab_size})"


Tokenizer = ByteTokenizer | CharTokenizer
TOKENIZERS = {"byte": ByteTokenizer, "char": CharTokenizer}


def tokenizer_from_json(text: str) -> Tokenizer:
  """Rebuilds a tokenizer from any tokenizer's `to_json()`."""
  kind = json.loads(text).get("type")
  if kind not in TOKENIZERS:
    raise ValueError(
        f"Unknown tokenizer type {kind!r} in {text[:80]!r}; known: {sorted(TOKENIZERS)}.")
  return TOKENIZERS[kind].from_json(text)


def make_tokenizer(kind: str, text: str | None = None) -> Tokenizer:
  """`"byte"` -> ByteTokenizer(); `"char"` -> CharTokenizer fitted on `text`."""
  if kind == "byte":
    return ByteTokenizer()
  if kind == "char":
    if text is None:
      raise ValueError("The char tokenizer is fitted on a corpus: pass its text.")
    return CharTokenizer.from_text(text)
  raise ValueError(f"Unknown tokenizer {kind!r}; set tokenizer to one of {sorted(TOKENIZERS)}.")


def _check_type(obj: dict, kind: str) -> None:
  if obj.get("type") != kind:
    raise ValueError(f"Expected a {kind!r} tokenizer json, got type {obj.get('type')!r}.")
