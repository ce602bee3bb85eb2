"""Packing documents into fixed-length rows with `segment_ids` and per-document `positions`.

`packed_documents` shuffles documents (re-shuffled each epoch), turns each into an
`inputs = doc[:-1]`, `targets = doc[1:]` pair, and packs them with grain's
`ConcatThenSplitIterDataset`: documents are concatenated and cut every T tokens, so rows have no
padding (except at the end of a finite stream) and a document longer than the space left
continues in the next row as a new segment. No target ever crosses a document boundary, because
targets are built per document before packing.

Rows: `inputs`, `targets` `[T]` int32, `segment_ids` `[T]` (1, 2, ... within the row; 0 = padding,
whose target is -100) and `positions` `[T]` (0, 1, ... restarting at each segment). The state of
the packed iterator (`get_state` / `set_state`) restores the stream exactly.
"""

from __future__ import annotations

import grain
import numpy as np

from seqmix.data.common import IGNORE, default_read_options, process_rows


def positions_from_segment_ids(segment_ids: np.ndarray) -> np.ndarray:
  """`[..., T]` segment ids -> int32 positions restarting at 0 wherever the id changes."""
  seg = np.asarray(segment_ids)
  t = np.arange(seg.shape[-1])
  change = np.ones(seg.shape, bool)
  change[..., 1:] = seg[..., 1:] != seg[..., :-1]
  start = np.maximum.accumulate(np.where(change, t, 0), axis=-1)  # index of each run's start
  return (t - start).astype(np.int32)


def _doc_to_example(tokens: np.ndarray) -> dict[str, np.ndarray]:
  tokens = np.asarray(tokens, np.int32)
  return {"inputs": tokens[:-1], "targets": tokens[1:]}


def _to_house_format(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  segment_ids = row["inputs_segment_ids"].astype(np.int32)
  targets = np.where(segment_ids == 0, IGNORE, row["targets"]).astype(np.int32)
  return {
      "inputs": row["inputs"].astype(np.int32),
      "targets": targets,
      "segment_ids": segment_ids,
      "positions": row["inputs_positions"].astype(np.int32),
  }


def pack_examples(examples: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Packs an IterDataset of `{"inputs", "targets"}` (each `[L_i]`) into rows of length T."""
  packed = grain.experimental.ConcatThenSplitIterDataset(
      examples, length_struct={"inputs": seq_len, "targets": seq_len})
  return packed.map(_to_house_format)


def packed_documents(read_document, num_documents: int, *, seq_len: int, batch_size: int,
                     seed: int, process_index: int | None = None,
                     process_count: int | None = None, num_epochs: int | None = None,
                     read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """Batches of packed documents.

  Args:
    read_document: `i -> int array [L_i]`, the tokens of document `i` (e.g. a TokenStore's
      `document`). Documents shorter than 2 tokens have no target and are skipped.
    num_documents: D.
    seq_len: T.
    batch_size: global B; this process gets `B // process_count` rows per batch.
    seed: document order (a new shuffle each epoch).
    process_index, process_count: default to jax's. Processes take disjoint documents
      (`i::count` of the shuffled stream).
    num_epochs: None repeats forever.

  Returns:
    `grain.IterDataset` of batches (dict of int32 `[B/P, T]`); `iter(...)` is resumable.
  """
  if num_documents < 1:
    raise ValueError("packed_documents needs at least one document.")
  p, count, rows = process_rows(batch_size, process_index, process_count)
  docs = grain.MapDataset.range(num_documents).shuffle(seed=seed).repeat(num_epochs)
  docs = docs[p::count].map(lambda i: _doc_to_example(read_document(int(i))))
  examples = docs.to_iter_dataset(read_options or default_read_options())
  examples = examples.filter(lambda ex: len(ex["inputs"]) > 0)
  return pack_examples(examples, seq_len).batch(rows, drop_remainder=num_epochs is None)
