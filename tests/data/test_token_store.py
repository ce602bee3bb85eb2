"""Tensorstore token store round trip, prepare_data CLI, packing with segment ids."""

import json

import numpy as np
import pytest

from experiments import prepare_data
from seqmix.data import packing, text, token_store, tokenizers

ONE = {"process_index": 0, "process_count": 1}


def test_round_trip(tmp_path):
  docs = [np.arange(10), np.array([], np.int64), np.arange(200, 256), np.array([7])]
  meta = token_store.write_token_store(tmp_path / "s", docs, tokenizers.ByteTokenizer(),
                                       chunk_size=16)
  store = token_store.TokenStore(tmp_path / "s")
  assert meta["document_offsets"] == [0, 10, 10, 66, 67] and meta["dtype"] == "uint8"
  assert len(store) == 67 and store.num_documents == 4 and store.vocab_size == 256
  for i, d in enumerate(docs):
    got = store.document(i)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, d)
  np.testing.assert_array_equal(store.read(5, 30), np.concatenate(docs)[5:30])  # across chunks
  assert json.loads((tmp_path / "s" / "metadata.json").read_text())["num_tokens"] == 67


def test_wide_vocab_dtype(tmp_path):
  tok = tokenizers.CharTokenizer([chr(0x4E00 + i) for i in range(300)])
  token_store.write_token_store(tmp_path, [np.array([0, 299, 150])], tok)
  store = token_store.TokenStore(tmp_path)
  assert store.metadata["dtype"] == "uint16" and store.tokenizer == tok
  np.testing.assert_array_equal(store.document(0), [0, 299, 150])


def test_rejects_out_of_vocab_ids(tmp_path):
  with pytest.raises(ValueError, match="outside"):
    token_store.write_token_store(tmp_path, [np.array([1, 256])], tokenizers.ByteTokenizer())


def test_missing_store_message(tmp_path):
  with pytest.raises(FileNotFoundError, match="prepare_data"):
    token_store.TokenStore(tmp_path / "nope")


def test_prepare_data_cli(tmp_path):
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top

  (tmp_path / "a.txt").write_text("hello world\n")
  (tmp_path / "b.txt").write_text("zebra!")
  out = tmp_path / "store"
  prepare_data.flags.FLAGS(["prepare_data"])  # parse defaults once
  with flagsaver.flagsaver(input=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                           output=str(out), tokenizer="char"):
    prepare_data.main(["prepare_data"])
  store = token_store.TokenStore(out)
  assert store.num_documents == 2
  assert store.tokenizer.decode(store.document(0)) == "hello world\n"
  assert store.tokenizer.decode(store.document(1)) == "zebra!"
  assert store.vocab_size == len(set("hello world\nzebra!"))
  assert store.metadata["sources"][1].endswith("b.txt")


def test_windows_read_through_tensorstore(tmp_path):
  docs = [np.arange(0, 50) % 256, np.arange(50, 130) % 256]
  token_store.write_token_store(tmp_path, docs, tokenizers.ByteTokenizer(), chunk_size=32)
  store = token_store.TokenStore(tmp_path)
  batch = next(text.train_iterator(store, seq_len=16, batch_size=32, seed=0, **ONE))
  flat = np.concatenate(docs)
  assert (batch["targets"] == -100).any()  # this seed's rows include a document boundary
  for inp, tgt, seg in zip(batch["inputs"], batch["targets"], batch["segment_ids"]):
    start = int(inp[0])
    np.testing.assert_array_equal(inp, flat[start:start + 16])
    cross = start + np.arange(16) == 49  # last token of document 0
    np.testing.assert_array_equal(tgt, np.where(cross, -100, flat[start + 1:start + 17]))
    # Ids count documents from the row's first one.
    np.testing.assert_array_equal(seg, 1 + (start + np.arange(16) >= 50) - (start >= 50))


def test_positions_from_segment_ids():
  seg = np.array([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(packing.positions_from_segment_ids(seg),
                                [[0, 1, 0, 1, 2, 0, 0, 1], list(range(8))])


def test_packed_documents_segments_and_targets():
  docs = [np.arange(100, 100 + n) for n in (5, 9, 3, 12, 1, 7)]
  ds = packing.packed_documents(lambda i: docs[i], len(docs), seq_len=8, batch_size=2, seed=0,
                                num_epochs=1, **ONE)
  batches = list(ds)
  pairs = []
  for b in batches:
    assert set(b) == {"inputs", "targets", "segment_ids", "positions"}
    for inp, tgt, seg, pos in zip(b["inputs"], b["targets"], b["segment_ids"], b["positions"]):
      np.testing.assert_array_equal(pos, packing.positions_from_segment_ids(seg))
      assert (tgt[seg == 0] == -100).all()
      for s in np.unique(seg[seg > 0]):
        m = seg == s
        # Within a segment: consecutive tokens of one document, each target its successor.
        np.testing.assert_array_equal(np.diff(inp[m]), 1)
        np.testing.assert_array_equal(tgt[m], inp[m] + 1)
      pairs += [(int(i), int(t)) for i, t in zip(inp[seg > 0], tgt[seg > 0])]
  want = sorted((int(i), int(i) + 1) for d in docs for i in d[:-1])
  assert sorted(pairs) == want  # every within-document target exactly once, none across docs


def test_packed_resume_from_state():
  docs = [np.arange(n) + 10 * n for n in range(2, 30)]
  make = lambda: iter(packing.packed_documents(lambda i: docs[i], len(docs), seq_len=16,
                                               batch_size=2, seed=1, **ONE))
  it = make()
  for _ in range(5):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(5)]
  again = make()
  again.set_state(state)
  for w in want:
    g = next(again)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])
