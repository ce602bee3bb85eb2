"""The ≈125M-parameter (GPT-2 small shape) language-model config shared by the LM benchmarks.

`size="1b"` gives the ≈1.3B shape of the multi-GPU benchmark (d_model 2048, 24 layers, MLP
hidden 5632 = 2.75·D so it divides every tensor-parallel size up to 8).
"""

import ml_collections

VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64

# size -> (d_model, n_layers, mlp_ratio)
SIZES = {"125m": (768, 12, 8 / 3), "1b": (2048, 24, 2.75)}


def lm_config(mixer: str, impl: str, seq_len: int,
              size: str = "125m") -> ml_collections.ConfigDict:
  """GPT-2 small's shape (or `SIZES[size]`) with the house defaults of a modern LM block."""
  if size not in SIZES:
    raise ValueError(f"lm_config: size={size!r}; choose one of {sorted(SIZES)}.")
  d_model, n_layers, mlp_ratio = SIZES[size]
  m = ml_collections.ConfigDict()
  m.vocab_size = VOCAB
  m.d_model = d_model
  m.n_layers = n_layers
  m.mixer = mixer
  m.mixer_kwargs = {} if impl == "auto" else {mixer: {"impl": impl}}
  m.mlp = "swiglu"
  m.mlp_ratio = mlp_ratio
  m.norm = "rmsnorm"
  m.tie_embeddings = True
  m.max_len = seq_len
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  return m
