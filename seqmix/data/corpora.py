"""Text corpora: find a local copy or download it once, verify it, split it.

`load_corpus(name)` looks, in order, in:

1. `$SEQMIX_DATA_DIR/<file>` for each of the corpus's accepted file names
   (tinyshakespeare: `tinyshakespeare.txt`, `input.txt`, `tinyshakespeare/input.txt`);
2. the user cache `$XDG_CACHE_HOME/seqmix/<name>.txt` (default `~/.cache/seqmix/`);
3. the corpus's public URL, downloaded into that cache (atomically) after a sha256 check
   (skipped when `SEQMIX_OFFLINE=1` or `download=False`).

Every copy, local or downloaded, is checked against the known sha256, so a truncated or edited
file fails loudly instead of silently changing the benchmark. `split_train_val` is nanoGPT's
split: the first 90% of the tokens train, the last 10% validate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tempfile
import urllib.error
import urllib.request

DATA_DIR_ENV = "SEQMIX_DATA_DIR"
OFFLINE_ENV = "SEQMIX_OFFLINE"  # "1": never download (CI, air-gapped hosts)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A known corpus: where it comes from and what its bytes must hash to."""

  name: str
  url: str
  sha256: str
  num_bytes: int
  filenames: tuple[str, ...]  # accepted names inside $SEQMIX_DATA_DIR, first preferred


CORPORA = {
    "tinyshakespeare": Corpus(
        name="tinyshakespeare",
        url=("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
             "tinyshakespeare/input.txt"),
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        num_bytes=1_115_394,
        filenames=("tinyshakespeare.txt", "input.txt", "tinyshakespeare/input.txt"),
    ),
}


class CorpusNotFoundError(FileNotFoundError):
  """No local copy and the download failed (offline, blocked, ...)."""


class ChecksumError(ValueError):
  """A corpus file does not have the expected sha256."""


def get_corpus(name: str) -> Corpus:
  if name not in CORPORA:
    raise ValueError(f"Unknown corpus {name!r}; known corpora: {sorted(CORPORA)}.")
  return CORPORA[name]


def cache_dir() -> pathlib.Path:
  """`$XDG_CACHE_HOME/seqmix`, else `~/.cache/seqmix`."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "seqmix"


def _fetch(url: str, timeout: float = 60.0) -> bytes:
  """Downloads `url`. A module-level function so tests replace it instead of the network."""
  with urllib.request.urlopen(url, timeout=timeout) as response:
    return response.read()


def _verify(data: bytes, corpus: Corpus, origin: str) -> None:
  digest = hashlib.sha256(data).hexdigest()
  if digest != corpus.sha256:
    raise ChecksumError(
        f"{origin} is not the expected {corpus.name} ({corpus.num_bytes:,} bytes, sha256 "
        f"{corpus.sha256}); it has {len(data):,} bytes and sha256 {digest}. Replace it with a "
        f"fresh copy of {corpus.url} (or delete it to re-download).")


def corpus_path(name: str, *, data_dir: str | os.PathLike | None = None,
                download: bool | None = None) -> pathlib.Path:
  """Path of a verified local copy of corpus `name`, downloading it to the cache if needed.

  Args:
    name: a key of `CORPORA`.
    data_dir: looked in first; defaults to `$SEQMIX_DATA_DIR`.
    download: if False, never touch the network (missing -> CorpusNotFoundError); default:
      True unless `$SEQMIX_OFFLINE` is 1.
  """
  corpus = get_corpus(name)
  if download is None:
    download = os.environ.get(OFFLINE_ENV, "").lower() not in ("1", "true", "yes")
  data_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
  looked = []
  if data_dir:
    for filename in corpus.filenames:
      path = pathlib.Path(data_dir) / filename
      looked.append(str(path))
      if path.is_file():
        _verify(path.read_bytes(), corpus, str(path))
        return path
  cached = cache_dir() / f"{corpus.name}.txt"
  looked.append(str(cached))
  if cached.is_file():
    _verify(cached.read_bytes(), corpus, str(cached))
    return cached

  hint = (f"Save {corpus.url} ({corpus.num_bytes:,} bytes) as {corpus.filenames[0]!r} (or "
          f"{corpus.filenames[1]!r}) in a directory and set {DATA_DIR_ENV} to that directory, or "
          f"save it as {cached}. Looked in: {', '.join(looked)}.")
  if not download:
    raise CorpusNotFoundError(
        f"Corpus {name!r} not found and downloads are off ({OFFLINE_ENV} or download=False). "
        f"{hint}")
  try:
    data = _fetch(corpus.url)
  except (urllib.error.URLError, OSError, TimeoutError) as e:
    raise CorpusNotFoundError(
        f"Corpus {name!r} is not on this machine and downloading {corpus.url} failed ({e}). "
        f"{hint}") from e
  _verify(data, corpus, f"The download of {corpus.url}")
  cached.parent.mkdir(parents=True, exist_ok=True)
  # Write-then-rename so a crash or a concurrent process never leaves a half-written cache file.
  with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False, suffix=".part") as f:
    f.write(data)
    tmp = f.name
  os.replace(tmp, cached)
  return cached


def load_corpus(name: str, *, data_dir: str | os.PathLike | None = None,
                download: bool | None = None) -> str:
  """The text of corpus `name` (see the module docstring for the lookup order)."""
  return corpus_path(name, data_dir=data_dir, download=download).read_text(encoding="utf-8")


def split_train_val(tokens, val_fraction: float = 0.1):
  """nanoGPT's split: `tokens[:n]` trains, `tokens[n:]` validates, `n = int((1 - f) * len)`.

  Works on str, lists and arrays `[N]` alike. For tinyshakespeare with the char tokenizer:
  1,003,854 train and 111,540 validation tokens (as nanoGPT's shakespeare_char prepare.py).
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  n = int(len(tokens) * (1.0 - val_fraction))
  return tokens[:n], tokens[n:]
