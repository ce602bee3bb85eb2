"""Corpus lookup order, verified download (mocked), split sizes."""

import hashlib

import pytest

from seqmix.data import corpora, tokenizers

FAKE_TEXT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"


@pytest.fixture
def fake_corpus(monkeypatch, tmp_path):
  """Registers a small corpus under the tinyshakespeare name's rules, with its own hash."""
  real = corpora.CORPORA["tinyshakespeare"]
  fake = corpora.Corpus(name="tinyshakespeare", url="https://example.invalid/input.txt",
                        sha256=hashlib.sha256(FAKE_TEXT).hexdigest(), num_bytes=len(FAKE_TEXT),
                        filenames=real.filenames)
  monkeypatch.setitem(corpora.CORPORA, "tinyshakespeare", fake)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.delenv(corpora.DATA_DIR_ENV, raising=False)

  def no_network(url, timeout=60.0):
    raise AssertionError(f"unexpected download of {url}")

  monkeypatch.setattr(corpora, "_fetch", no_network)
  return fake


@pytest.mark.parametrize("name", ["tinyshakespeare.txt", "input.txt", "tinyshakespeare/input.txt"])
def test_data_dir_first(fake_corpus, monkeypatch, tmp_path, name):
  path = tmp_path / "data" / name
  path.parent.mkdir(parents=True)
  path.write_bytes(FAKE_TEXT)
  # A cache copy exists too: the data dir must win.
  cached = corpora.cache_dir() / "tinyshakespeare.txt"
  cached.parent.mkdir(parents=True)
  cached.write_bytes(b"other")
  monkeypatch.setenv(corpora.DATA_DIR_ENV, str(tmp_path / "data"))
  assert corpora.corpus_path("tinyshakespeare") == path
  assert corpora.load_corpus("tinyshakespeare") == FAKE_TEXT.decode()


def test_cache_when_no_data_dir(fake_corpus, monkeypatch, tmp_path):
  monkeypatch.setenv(corpora.DATA_DIR_ENV, str(tmp_path / "empty"))
  cached = tmp_path / "cache" / "seqmix" / "tinyshakespeare.txt"
  cached.parent.mkdir(parents=True)
  cached.write_bytes(FAKE_TEXT)
  assert corpora.corpus_path("tinyshakespeare") == cached


def test_download_into_cache_then_reuse(fake_corpus, monkeypatch):
  calls = []

  def fetch(url, timeout=60.0):
    calls.append(url)
    return FAKE_TEXT

  monkeypatch.setattr(corpora, "_fetch", fetch)
  assert corpora.load_corpus("tinyshakespeare") == FAKE_TEXT.decode()
  assert calls == [fake_corpus.url]
  assert (corpora.cache_dir() / "tinyshakespeare.txt").read_bytes() == FAKE_TEXT
  assert not list(corpora.cache_dir().glob("*.part"))
  corpora.load_corpus("tinyshakespeare")
  assert len(calls) == 1  # served from the cache


def test_download_checksum_mismatch(fake_corpus, monkeypatch):
  monkeypatch.setattr(corpora, "_fetch", lambda url, timeout=60.0: FAKE_TEXT + b"x")
  with pytest.raises(corpora.ChecksumError, match="sha256"):
    corpora.load_corpus("tinyshakespeare")
  assert not (corpora.cache_dir() / "tinyshakespeare.txt").exists()


def test_local_checksum_mismatch(fake_corpus, monkeypatch, tmp_path):
  (tmp_path / "input.txt").write_bytes(b"not shakespeare")
  monkeypatch.setenv(corpora.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(corpora.ChecksumError, match=str(tmp_path / "input.txt")):
    corpora.load_corpus("tinyshakespeare")


def test_offline_message_names_data_dir(fake_corpus, monkeypatch):
  import urllib.error

  def offline(url, timeout=60.0):
    raise urllib.error.URLError("no network")

  monkeypatch.setattr(corpora, "_fetch", offline)
  with pytest.raises(corpora.CorpusNotFoundError) as e:
    corpora.load_corpus("tinyshakespeare")
  assert "SEQMIX_DATA_DIR" in str(e.value) and "tinyshakespeare.txt" in str(e.value)
  with pytest.raises(corpora.CorpusNotFoundError, match="SEQMIX_DATA_DIR"):
    corpora.load_corpus("tinyshakespeare", download=False)


def test_offline_env_never_fetches(fake_corpus, monkeypatch):
  monkeypatch.setenv(corpora.OFFLINE_ENV, "1")  # fake_corpus's _fetch fails the test if called
  with pytest.raises(corpora.CorpusNotFoundError, match="SEQMIX_OFFLINE"):
    corpora.load_corpus("tinyshakespeare")


def test_unknown_corpus_lists_known():
  with pytest.raises(ValueError, match="tinyshakespeare"):
    corpora.load_corpus("wikitext")


def test_split_is_first_90_percent():
  train, val = corpora.split_train_val(list(range(101)))
  assert train == list(range(90)) and val == list(range(90, 101))


def test_real_tinyshakespeare(tinyshakespeare_path):
  # The fixture finds the corpus through $SEQMIX_DATA_DIR; fails instead of skipping in CI.
  text = corpora.load_corpus("tinyshakespeare", download=False)
  assert len(text) == 1_115_394
  tok = tokenizers.CharTokenizer.from_text(text)
  assert tok.vocab_size == 65  # nanoGPT shakespeare_char
  train, val = corpora.split_train_val(tok.encode(text))
  assert (len(train), len(val)) == (1_003_854, 111_540)
