"""One entry point from a config's `data` block to training and validation batches.

    ds = make_datasets(cfg.data, seq_len=256, batch_size=64, seed=0)
    batch = next(ds.train)                # dict of int32 numpy [B/P, T]
    state = ds.train.get_state()          # JSON-able; ds.train.set_state(state) resumes exactly
    for batch in ds.validation(): ...     # the whole validation split, once, fixed shapes
    ds.vocab_size, ds.decode(ids)

`data_cfg.name` picks the source; the fields each one reads (an ml-collections ConfigDict, a dict
or any object with attributes):

- "tinyshakespeare": `tokenizer` ("char" (default, 65 symbols) | "byte"), optional `data_dir`
  (default `$SEQMIX_DATA_DIR`, then the user cache, then a verified download), `val_fraction`
  (0.1). Training: random windows; validation: the last 10%, every target once.
- "tokens": `path` (a store written by `python -m experiments.prepare_data`), optional
  `val_path` (a second store; else the last `val_fraction` of `path`'s tokens), `packed`
  (False: random windows, with `segment_ids`/`positions` when the store has several documents;
  True: shuffled documents packed with segment ids, `path` is then used whole for training
  and `val_path` is required).
- "mqar": `vocab_size`, `num_kv_pairs`, `num_train_examples`, `num_test_examples`, optional
  `power_a` (0.01), `random_non_queries` (True); `seq_len` is the sequence length. Train set
  from `seed`, test set from `seed + 10` (zoology).
- "copy": the lag-k copy task of `seqmix.data.copying` (`targets[t] = inputs[t - lag]`); fields
  as `seqmix.data.copying.make_datasets` documents (`vocab_size`, `lag`, `num_val_examples`).

Any source: `pose_target_len` (optional) gives the training batches PoSE `positions` covering
that length (`seqmix.data.pose`, `pose_chunks` chunks, default 2).

`batch_size` is global: each JAX process gets `batch_size // jax.process_count()` rows.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from seqmix.data import common, corpora, mqar, packing, pose, text, token_store, tokenizers

_REQUIRED = object()


class Datasets(NamedTuple):
  """What `make_datasets` returns."""

  train: Any  # grain DatasetIterator: next() -> batch; get_state() / set_state(state)
  validation: Callable[[], Iterator[dict[str, np.ndarray]]]  # fresh pass over the whole split
  vocab_size: int
  decode: Callable[[Any], str]  # token ids [T] -> text


def _get(cfg, field: str, default=_REQUIRED, *, what: str = ""):
  """`cfg.field` from a ConfigDict / dict / object; a missing or None required field says what
  to set."""
  if hasattr(cfg, "get") and callable(cfg.get):
    value = cfg.get(field, None)
  else:
    value = getattr(cfg, field, None)
  if value is None:
    if default is _REQUIRED:
      name = _get(cfg, "name", None) if field != "name" else None
      needs = f"data.name={name!r} needs " if name else ""
      raise ValueError(f"The data config {needs}the field {field!r}{f' ({what})' if what else ''}; "
                       f"set it in the config's data block, e.g. --config.data.{field}=...")
    return default
  return value


def make_datasets(data_cfg, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Datasets:
  """Builds the train iterator, validation pass, vocab size and decoder (module docstring).

  Args:
    data_cfg: the config's data block; `name` selects the source.
    seq_len: T of every batch.
    batch_size: global B (each process gets B // process_count rows).
    seed: the training stream (window offsets / example order) is a function of it.
    process_index, process_count: default to jax.process_index() / jax.process_count().
  """
  name = _get(data_cfg, "name", what=f"one of {sorted(_BUILDERS)}")
  if name not in _BUILDERS:
    raise ValueError(f"Unknown data.name={name!r}; known: {sorted(_BUILDERS)}.")
  shard = {"process_index": process_index, "process_count": process_count}
  ds = _BUILDERS[name](data_cfg, seq_len=seq_len, batch_size=batch_size, seed=seed, **shard)
  pose_target = _get(data_cfg, "pose_target_len", None)
  if pose_target is not None:   # PoSE training positions (seqmix.data.pose); validation as is
    ds = ds._replace(train=pose.PoseIterator(ds.train, target_len=int(pose_target), seed=seed,
                                             num_chunks=int(_get(data_cfg, "pose_chunks", 2))))
  return ds


def _windows(train_src, val_src, *, seq_len, batch_size, seed, vocab_size, decode, **shard):
  return Datasets(
      train=text.train_iterator(train_src, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                **shard),
      validation=text.validation_batches_fn(val_src, seq_len=seq_len, batch_size=batch_size,
                                            **shard),
      vocab_size=vocab_size,
      decode=decode)


def _tinyshakespeare(cfg, *, seq_len, batch_size, seed, **shard) -> Datasets:
  kind = _get(cfg, "tokenizer", "char")
  if kind not in tokenizers.TOKENIZERS:
    raise ValueError(f"data.tokenizer={kind!r}; set it to one of {sorted(tokenizers.TOKENIZERS)}.")
  corpus = corpora.load_corpus("tinyshakespeare", data_dir=_get(cfg, "data_dir", None))
  tok = tokenizers.make_tokenizer(kind, corpus)
  train, val = corpora.split_train_val(tok.encode(corpus), _get(cfg, "val_fraction", 0.1))
  return _windows(train, val, seq_len=seq_len, batch_size=batch_size, seed=seed,
                  vocab_size=tok.vocab_size, decode=tok.decode, **shard)


def _tokens(cfg, *, seq_len, batch_size, seed, **shard) -> Datasets:
  store = token_store.TokenStore(
      _get(cfg, "path", what="a directory written by `python -m experiments.prepare_data`"))
  val_path = _get(cfg, "val_path", None)
  val_store = token_store.TokenStore(val_path) if val_path else None
  if val_store is not None and val_store.tokenizer != store.tokenizer:
    raise ValueError(f"data.val_path={val_path} was tokenized with {val_store.tokenizer}, "
                     f"data.path with {store.tokenizer}; prepare both with the same --tokenizer.")
  tok = store.tokenizer
  if _get(cfg, "packed", False):
    if val_store is None:
      _get(cfg, "val_path", what="packed training uses all of data.path; validation needs its "
           "own store")
    p, count, _ = common.process_rows(batch_size, shard["process_index"], shard["process_count"])
    train = iter(packing.packed_documents(
        store.document, store.num_documents, seq_len=seq_len, batch_size=batch_size, seed=seed,
        process_index=p, process_count=count))
    validation = text.validation_batches_fn(val_store, seq_len=seq_len, batch_size=batch_size,
                                            **shard)
    return Datasets(train, validation, tok.vocab_size, tok.decode)
  if val_store is None:
    train_src, val_src = text.split_source(store, _get(cfg, "val_fraction", 0.1))
  else:
    train_src, val_src = store, val_store
  return _windows(train_src, val_src, seq_len=seq_len, batch_size=batch_size, seed=seed,
                  vocab_size=tok.vocab_size, decode=tok.decode, **shard)


def _mqar(cfg, *, seq_len, batch_size, seed, **shard) -> Datasets:
  mcfg = mqar.MQARConfig(
      vocab_size=_get(cfg, "vocab_size", what="MQAR vocabulary V: keys [1, V/2), values [V/2, V)"),
      seq_len=seq_len,
      num_kv_pairs=_get(cfg, "num_kv_pairs", what="key-value pairs per example"),
      power_a=_get(cfg, "power_a", 0.01),
      random_non_queries=_get(cfg, "random_non_queries", True))
  mcfg.validate()
  num_train = _get(cfg, "num_train_examples", what="size of the fixed training set")
  num_test = _get(cfg, "num_test_examples", what="size of the test set")
  train = mqar.mqar_train(mcfg, num_examples=num_train, batch_size=batch_size, seed=seed, **shard)
  test = mqar.mqar_test(mcfg, num_examples=num_test, batch_size=batch_size, seed=seed, **shard)
  read_options = common.default_read_options()
  return Datasets(
      train=iter(train.to_iter_dataset(read_options)),
      validation=lambda: iter(test.to_iter_dataset(read_options)),
      vocab_size=mcfg.vocab_size,
      decode=_decode_ids)


def _copy(cfg, *, seq_len, batch_size, seed, **shard) -> Datasets:
  try:
    copying = importlib.import_module("seqmix.data.copying")
  except ImportError as e:
    raise ValueError("data.name='copy' needs seqmix.data.copying, which is not in this "
                     "checkout.") from e
  if not hasattr(copying, "make_datasets"):
    raise NotImplementedError(
        "data.name='copy': seqmix.data.copying has no make_datasets(data_cfg, *, seq_len, "
        "batch_size, seed, process_index, process_count) -> Datasets to dispatch to.")
  return copying.make_datasets(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed, **shard)


def _decode_ids(ids) -> str:
  """Synthetic tasks have no text: ids as space-separated numbers."""
  return " ".join(str(int(i)) for i in np.asarray(ids).reshape(-1))


_BUILDERS = {
    "tinyshakespeare": _tinyshakespeare,
    "tokens": _tokens,
    "mqar": _mqar,
    "copy": _copy,
}
