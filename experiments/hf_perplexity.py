r"""Perplexity of a local Hugging Face checkpoint on a text, in transformers and converted to seqmix.

  python -m experiments.hf_perplexity --path /ckpt/gpt2 --text tinyshakespeare \
      --seq_len 512 --max_tokens 32768

`--path` is a local directory (config.json, safetensors, tokenizer files): nothing is
downloaded. `--text tinyshakespeare` finds the corpus as `seqmix.data.corpora` does (also
`$SEQMIX_DATA_DIR`); any other value is a text file. The text is tokenized with the
checkpoint's own tokenizer, cut into non-overlapping windows of seq_len tokens, and both
models score every next token of every window in float32; the script prints both perplexities
and their relative difference.
"""

from __future__ import annotations

import math

import numpy as np
from absl import app
from absl import flags

# Defined by define_flags() when the module runs as a script: importing it (the tests do)
# defines no absl flags, since several experiments share flag names.
_PATH = _TEXT = _SEQ_LEN = _MAX_TOKENS = _BATCH = None


def define_flags() -> None:
  global _PATH, _TEXT, _SEQ_LEN, _MAX_TOKENS, _BATCH
  _PATH = flags.DEFINE_string("path", None, "Local HF checkpoint directory.", required=True)
  _TEXT = flags.DEFINE_string("text", "tinyshakespeare", "'tinyshakespeare' or a text file path.")
  _SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Tokens per scored window.")
  _MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32768,
                                     "Tokens of the text scored (from the start).")
  _BATCH = flags.DEFINE_integer("batch", 4, "Windows per forward pass.")


def windows(ids, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
  """[N, seq_len] int: the first whole windows of `ids` (at most max_tokens tokens)."""
  ids = np.asarray(ids, np.int64)[:max_tokens]
  n = len(ids) // seq_len
  if n == 0:
    raise ValueError(f"the text has {len(ids)} tokens, fewer than seq_len={seq_len}; lower "
                     "--seq_len.")
  return ids[: n * seq_len].reshape(n, seq_len)


def _nll(logits, tokens) -> tuple[float, int]:
  """Summed next-token negative log-likelihood (float64) and the count of scored tokens."""
  logits = np.asarray(logits, np.float64)[:, :-1]
  target = np.asarray(tokens)[:, 1:]
  m = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
  picked = np.take_along_axis(logits, target[..., None], -1)[..., 0]
  return float((lse - picked).sum()), target.size


def perplexities(path: str, tokens: np.ndarray, batch: int = 4) -> tuple[float, float]:
  """(seqmix perplexity, transformers perplexity) of a local checkpoint on windows [N, T]."""
  import jax
  import torch
  import transformers

  from seqmix import convert
  from seqmix.models import lm

  cfg, params = convert.from_hf(path, progress=False)
  model = lm.from_config(cfg)
  apply = jax.jit(model.apply)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         local_files_only=True).eval()
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  totals = {"seqmix": [0.0, 0], "hf": [0.0, 0]}
  for i in range(0, len(tokens), batch):
    chunk = tokens[i:i + batch]
    ours, _ = apply({"params": params}, chunk.astype(np.int32))
    with torch.no_grad():
      theirs = hf(torch.as_tensor(chunk)).logits.float().numpy()
    for name, logits in (("seqmix", ours), ("hf", theirs)):
      s, c = _nll(logits, chunk)
      totals[name][0] += s
      totals[name][1] += c
  return tuple(math.exp(s / c) for s, c in (totals["seqmix"], totals["hf"]))


def _read_text(name: str) -> str:
  if name == "tinyshakespeare":
    from seqmix.data import corpora
    name = corpora.corpus_path("tinyshakespeare", download=False)
  with open(name, encoding="utf-8") as f:
    return f.read()


def main(argv):
  del argv
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(_PATH.value, local_files_only=True)
  ids = tok(_read_text(_TEXT.value))["input_ids"]
  tokens = windows(ids, _SEQ_LEN.value, _MAX_TOKENS.value)
  ours, theirs = perplexities(_PATH.value, tokens, _BATCH.value)
  print(f"{_PATH.value}: {tokens.size} tokens in {len(tokens)} windows of {_SEQ_LEN.value}")
  print(f"perplexity  seqmix {ours:.4f}  transformers {theirs:.4f}  "
        f"relative difference {abs(ours - theirs) / theirs:.2e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
