"""The ≈125M-parameter (GPT-2 small shape) language-model config shared by the LM benchmarks."""

import ml_collections

VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64


def lm_config(mixer: str, impl: str, seq_len: int) -> ml_collections.ConfigDict:
  """GPT-2 small's shape with the house defaults of a modern LM block."""
  m = ml_collections.ConfigDict()
  m.vocab_size = VOCAB
  m.d_model = 768
  m.n_layers = 12
  m.mixer = mixer
  m.mixer_kwargs = {} if impl == "auto" else {mixer: {"impl": impl}}
  m.mlp = "swiglu"
  m.mlp_ratio = 8 / 3
  m.norm = "rmsnorm"
  m.tie_embeddings = True
  m.max_len = seq_len
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  return m
