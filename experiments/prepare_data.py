r"""Tokenizes text files into a seqmix token store (tensorstore zarr + metadata.json).

Each input file is one document. Usage:

  python -m experiments.prepare_data --input a.txt --input b.txt --output /data/ab \
      --tokenizer byte

Train on it with a config whose data block is `name="tokens", path="/data/ab"` (see
seqmix/data/pipeline.py). With `--tokenizer char`, the vocabulary is the sorted set of
characters of all inputs together.
"""

from __future__ import annotations

import pathlib

from absl import app
from absl import flags

from seqmix.data import token_store
from seqmix.data import tokenizers

_INPUT = flags.DEFINE_multi_string("input", None, "Text file(s) to tokenize; repeat the flag.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory of the token store to write.")
_TOKENIZER = flags.DEFINE_enum("tokenizer", "byte", sorted(tokenizers.TOKENIZERS),
                               "byte: UTF-8 bytes (vocab 256); char: the inputs' characters.")
_CHUNK = flags.DEFINE_integer("chunk_size", 1 << 16, "Tokens per zarr chunk.")


def prepare(inputs: list[str], output: str, tokenizer: str = "byte",
            chunk_size: int = 1 << 16) -> dict:
  """Library form of the CLI; returns the written metadata."""
  paths = [pathlib.Path(p) for p in inputs]
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"--input files not found: {missing}")
  if tokenizer == "char":
    # The char vocabulary needs every input's characters before any document is encoded.
    chars = set()
    for p in paths:
      chars |= set(p.read_text(encoding="utf-8"))
    tok = tokenizers.CharTokenizer(sorted(chars))
  else:
    tok = tokenizers.make_tokenizer(tokenizer)
  documents = (tok.encode(p.read_text(encoding="utf-8")) for p in paths)
  return token_store.write_token_store(output, documents, tok, sources=[str(p) for p in paths],
                                       chunk_size=chunk_size)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  meta = prepare(_INPUT.value, _OUTPUT.value, _TOKENIZER.value, _CHUNK.value)
  print(f"Wrote {meta['num_tokens']:,} tokens in {meta['num_documents']} documents "
        f"(vocab {meta['vocab_size']}, {meta['dtype']}) to {_OUTPUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["input", "output"])
  app.run(main)
