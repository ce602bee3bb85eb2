"""Token arrays on disk: a chunked zarr array read through tensorstore, plus a json of metadata.

Layout of a store directory (written by `write_token_store` / `experiments/prepare_data.py`):

    <dir>/tokens/          zarr array [N], the documents concatenated, chunked (default 2**16),
                           dtype uint8 / uint16 / int32 (the smallest that holds the vocabulary)
    <dir>/metadata.json    {"format_version", "tokenizer" (its to_json), "vocab_size",
                            "num_tokens", "num_documents", "document_offsets" [D+1],
                            "sources" [D], "dtype", "chunk_size"}

Document `i` is `tokens[document_offsets[i]:document_offsets[i+1]]`. Training reads windows by
random access (`TokenStore.read` is a tensorstore slice read), so the array never needs to fit
in memory; the writer streams documents in, growing the array as it goes.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import tensorstore as ts

from seqmix.data.tokenizers import Tokenizer, tokenizer_from_json

FORMAT_VERSION = 1
METADATA = "metadata.json"
TOKENS = "tokens"


def _spec(path: pathlib.Path) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path / TOKENS)}}


def _dtype_for(vocab_size: int) -> np.dtype:
  if vocab_size <= 1 << 8:
    return np.dtype(np.uint8)
  if vocab_size <= 1 << 16:
    return np.dtype(np.uint16)
  return np.dtype(np.int32)


def write_token_store(path: str | os.PathLike, documents: Iterable[np.ndarray],
                      tokenizer: Tokenizer, *, sources: Sequence[str] | None = None,
                      chunk_size: int = 1 << 16) -> dict:
  """Writes token documents (each int `[L_i]`) to a store at `path` (replaced if present).

  Returns:
    The metadata dict also written to `<path>/metadata.json`.
  """
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  dtype = _dtype_for(tokenizer.vocab_size)
  arr = ts.open(_spec(path), create=True, delete_existing=True, dtype=ts.dtype(dtype.name),
                shape=[0], chunk_layout=ts.ChunkLayout(chunk_shape=[chunk_size])).result()
  offsets = [0]
  for doc in documents:
    doc = np.asarray(doc)
    if doc.ndim != 1:
      raise ValueError(f"Each document must be a 1-D token array, got shape {doc.shape}.")
    if doc.size and (doc.min() < 0 or doc.max() >= tokenizer.vocab_size):
      raise ValueError(f"Document {len(offsets) - 1} has ids outside [0, {tokenizer.vocab_size}).")
    start, stop = offsets[-1], offsets[-1] + len(doc)
    if stop > start:
      arr = arr.resize(exclusive_max=[stop]).result()
      arr[start:stop].write(doc.astype(dtype)).result()
    offsets.append(stop)
  num_docs = len(offsets) - 1
  if sources is not None and len(sources) != num_docs:
    raise ValueError(f"{len(sources)} source names for {num_docs} documents.")
  metadata = {
      "format_version": FORMAT_VERSION,
      "tokenizer": json.loads(tokenizer.to_json()),
      "vocab_size": tokenizer.vocab_size,
      "num_tokens": offsets[-1],
      "num_documents": num_docs,
      "document_offsets": offsets,
      "sources": list(sources) if sources is not None else None,
      "dtype": dtype.name,
      "chunk_size": chunk_size,
  }
  (path / METADATA).write_text(json.dumps(metadata, indent=1))
  return metadata


class TokenStore:
  """A written store, opened for random-access reads (a `TokenSource` for seqmix.data.text)."""

  def __init__(self, path: str | os.PathLike, *, cache_bytes: int = 64 << 20):
    path = pathlib.Path(path)
    meta_path = path / METADATA
    if not meta_path.is_file():
      raise FileNotFoundError(
          f"{path} is not a token store (no {METADATA}); write one with "
          f"`python -m experiments.prepare_data --input file.txt --output {path}`.")
    self.path = path
    self.metadata = json.loads(meta_path.read_text())
    if self.metadata.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{meta_path}: format_version {self.metadata.get('format_version')}, "
                       f"this seqmix reads {FORMAT_VERSION}; re-run experiments.prepare_data.")
    self.tokenizer = tokenizer_from_json(json.dumps(self.metadata["tokenizer"]))
    self.document_offsets = np.asarray(self.metadata["document_offsets"], np.int64)  # [D+1]
    self.document_starts = self.document_offsets[:-1]  # [D]
    # A chunk cache: neighbouring random windows share chunks, and each chunk decodes once.
    context = ts.Context({"cache_pool": {"total_bytes_limit": cache_bytes}})
    self._array = ts.open(_spec(path), open=True, read=True, context=context).result()
    if self._array.shape[0] != self.metadata["num_tokens"]:
      raise ValueError(f"{path}: array has {self._array.shape[0]} tokens, metadata says "
                       f"{self.metadata['num_tokens']}; the store is incomplete, rewrite it.")

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def num_documents(self) -> int:
    return len(self.document_starts)

  def __len__(self) -> int:
    return int(self._array.shape[0])

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens `[start, stop)` as int32 (one tensorstore read)."""
    return self._array[start:stop].read().result().astype(np.int32)

  def document(self, i: int) -> np.ndarray:
    """Tokens of document `i`, int32 `[L_i]`."""
    return self.read(int(self.document_offsets[i]), int(self.document_offsets[i + 1]))

  def __getstate__(self):
    # Tensorstore handles do not pickle; reopen from the path (grain worker processes).
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])


def open_token_store(path: str | os.PathLike) -> TokenStore:
  return TokenStore(path)
