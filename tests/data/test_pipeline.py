"""make_datasets: each source end to end, and the messages for bad data configs."""

import urllib.error

import ml_collections
import numpy as np
import pytest

from seqmix.data import corpora, pipeline, token_store, tokenizers

ONE = {"process_index": 0, "process_count": 1}


def _cfg(**kw):
  return ml_collections.ConfigDict(kw)


def _check_batches(ds, seq_len, rows):
  batch = next(ds.train)
  assert batch["inputs"].shape == batch["targets"].shape == (rows, seq_len)
  assert all(v.dtype == np.int32 for v in batch.values())
  assert batch["inputs"].max() < ds.vocab_size
  state = ds.train.get_state()
  nxt = next(ds.train)
  ds.train.set_state(state)
  np.testing.assert_array_equal(next(ds.train)["inputs"], nxt["inputs"])
  scored = 0
  for b in ds.validation():
    assert b["inputs"].shape == (rows, seq_len)
    scored += int((b["targets"] != -100).sum())
  return scored


@pytest.mark.parametrize("tokenizer,vocab", [("char", 65), ("byte", 256)])
def test_tinyshakespeare(tinyshakespeare_path, tokenizer, vocab):
  # The fixture finds the corpus through $SEQMIX_DATA_DIR; fails instead of skipping in CI.
  ds = pipeline.make_datasets(_cfg(name="tinyshakespeare", tokenizer=tokenizer), seq_len=256,
                              batch_size=64, seed=0, **ONE)
  assert ds.vocab_size == vocab
  assert _check_batches(ds, 256, 64) == 111_540 - 1  # every validation target once
  assert ds.decode(next(ds.train)["inputs"][0]) in tinyshakespeare_path.read_text()


def test_tinyshakespeare_missing_corpus_message(monkeypatch, tmp_path):
  monkeypatch.setenv(corpora.DATA_DIR_ENV, str(tmp_path))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

  def offline(url, timeout=60.0):
    raise urllib.error.URLError("offline")

  monkeypatch.setattr(corpora, "_fetch", offline)
  with pytest.raises(corpora.CorpusNotFoundError, match="SEQMIX_DATA_DIR"):
    pipeline.make_datasets(_cfg(name="tinyshakespeare"), seq_len=8, batch_size=2, seed=0, **ONE)


def test_tokens_windows_and_packed(tmp_path):
  tok = tokenizers.ByteTokenizer()
  docs = [tok.encode("the first document. " * 20), tok.encode("and a second one! " * 15)]
  token_store.write_token_store(tmp_path / "train", docs, tok)
  token_store.write_token_store(tmp_path / "val", [tok.encode("held out text " * 10)], tok)
  total = sum(len(d) for d in docs)

  ds = pipeline.make_datasets(_cfg(name="tokens", path=str(tmp_path / "train")), seq_len=32,
                              batch_size=4, seed=0, **ONE)
  assert ds.vocab_size == 256 and ds.decode(tok.encode("abc")) == "abc"
  val_tokens = total - int(total * 0.9)
  assert _check_batches(ds, 32, 4) == val_tokens - 1

  ds = pipeline.make_datasets(
      _cfg(name="tokens", path=str(tmp_path / "train"), val_path=str(tmp_path / "val"),
           packed=True), seq_len=32, batch_size=4, seed=0, **ONE)
  assert {"segment_ids", "positions"} <= set(next(ds.train))
  assert _check_batches(ds, 32, 4) == 14 * 10 - 1


def test_mqar():
  cfg = _cfg(name="mqar", vocab_size=64, num_kv_pairs=4, num_train_examples=32,
             num_test_examples=10)
  ds = pipeline.make_datasets(cfg, seq_len=32, batch_size=8, seed=0, **ONE)
  assert ds.vocab_size == 64
  assert _check_batches(ds, 32, 8) == 10 * 4  # every test example's 4 queries


def test_copy_dispatch():
  pytest.importorskip("seqmix.data.copying")
  ds = pipeline.make_datasets(_cfg(name="copy", vocab_size=16, lag=2, num_val_examples=16),
                              seq_len=12, batch_size=4, seed=0, **ONE)
  assert ds.vocab_size == 16
  batch = next(ds.train)
  np.testing.assert_array_equal(batch["targets"][:, 2:], batch["inputs"][:, :-2])
  assert _check_batches(ds, 12, 4) == 16 * 10


@pytest.mark.parametrize("cfg,match", [
    (dict(name="wikitext"), "known: \\['copy', 'mqar', 'tinyshakespeare', 'tokens'\\]"),
    (dict(), "'name'"),
    (dict(name="tokens"), "data.name='tokens' needs the field 'path'.*prepare_data"),
    (dict(name="tokens", path=None), "--config.data.path"),
    (dict(name="mqar", vocab_size=64, num_kv_pairs=4), "num_train_examples"),
    (dict(name="mqar", vocab_size=64, num_kv_pairs=9, num_train_examples=2,
          num_test_examples=2), "4 \\* num_kv_pairs <= seq_len"),
    (dict(name="tinyshakespeare", tokenizer="bpe"), "data.tokenizer='bpe'"),
])
def test_bad_config_messages(cfg, match):
  with pytest.raises(ValueError, match=match):
    pipeline.make_datasets(_cfg(**cfg), seq_len=32, batch_size=4, seed=0, **ONE)


def test_missing_store_path_message(tmp_path):
  with pytest.raises(FileNotFoundError, match="prepare_data"):
    pipeline.make_datasets(_cfg(name="tokens", path=str(tmp_path)), seq_len=8, batch_size=2,
                           seed=0, **ONE)
