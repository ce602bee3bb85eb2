"""nanoGPT's shakespeare_char, like for like, with a choice of mixer.

Launch (H100, ~5000 steps):
  python -m experiments.train --config experiments/configs/shakespeare_char.py:mixer=mha \
      --workdir runs/shakespeare_char_mha
Smoke (CPU, seconds):
  python -m experiments.train --config experiments/configs/shakespeare_char.py:mixer=mha,smoke \
      --workdir /tmp/shakespeare_smoke
Arguments: mixer=<registry name> (default mha; other mixers run with their default
hyperparameters, everything else unchanged), smoke.

Matches nanoGPT's config/train_shakespeare_char.py on top of its train.py/model.py defaults:
6 layers, 6 heads, width 384, context 256, learned absolute positions, LayerNorm without
bias (bias=False), exact-erf GELU MLP x4, tied embeddings, dropout 0.2, GPT-2 init (std
0.02, residual projections / sqrt(2 n_layers)); batch 64, AdamW b1 0.9 b2 0.99 weight decay
0.1 on params with ndim >= 2 (embeddings included), grad clip 1.0, lr 1e-3 with 100 linear
warmup steps then cosine to 1e-4 at step 5000, bf16 compute with float32 params,
evaluation every 250 steps, samples of 500 tokens at temperature 0.8 with top-k 200 (nanoGPT's sample.py).
Differences: nanoGPT estimates val loss on eval_iters=200 random batches; here it is the
token-weighted mean over the WHOLE validation split (the last 10% of the text, every target
once). nanoGPT runs iterations 0..max_iters inclusive (5001 updates); here 5000. Attention
dropout is the mha mixer's `attn_dropout` (computed by the attention op's reference form,
the only form with dropout).
"""

import ml_collections

from experiments.configs import common
from seqmix.train.config import train_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args, flags = common.parse_arg(arg, {"mixer": "mha"})
  mixer = args["mixer"]
  smoke = "smoke" in flags
  c = ml_collections.ConfigDict()
  c.seed = 1337  # nanoGPT's torch.manual_seed; here the init/dropout/data PRNG seed

  c.data = ml_collections.ConfigDict()
  c.data.name = "tinyshakespeare"  # corpus: $SEQMIX_DATA_DIR/tinyshakespeare.txt (or cache)
  c.data.tokenizer = "char"        # 65 characters, as nanoGPT's prepare.py

  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 0                 # 0: taken from the data (65 for char-level)
  m.d_model = 32 if smoke else 384  # n_embd
  m.n_layers = 2 if smoke else 6   # n_layer
  m.mixer = mixer                  # registry name of the sequence mixer in every block
  heads = 2 if smoke else 6        # n_head
  # the mixer's hyperparameters; mha gets nanoGPT's heads, no rotary position (learned
  # absolute positions are added at the embedding instead) and nanoGPT's dropout on the
  # attention probabilities (its resid_dropout is the model's residual dropout below)
  m.mixer_kwargs = ({"mha": {"num_heads": heads, "position": "none",
                             "attn_dropout": 0.0 if smoke else 0.2}}
                    if mixer == "mha" else {})
  m.mlp = "gelu"                   # nanoGPT MLP: Linear(4D) -> GELU -> Linear(D)
  m.mlp_ratio = 4.0                # hidden width = 4 * d_model
  m.norm = "layernorm"             # nanoGPT LayerNorm
  m.norm_eps = 1e-5                # torch layer_norm's eps
  m.use_bias = False               # nanoGPT bias=False (norms and linears)
  m.tie_embeddings = True          # wte.weight is lm_head.weight
  m.pos_embedding = "learned"      # wpe
  m.max_len = 32 if smoke else 256  # block_size
  m.dropout = 0.0 if smoke else 0.2  # embedding and residual dropout
  m.dtype = "float32" if smoke else "bfloat16"  # compute dtype (nanoGPT autocasts to bf16)
  m.param_dtype = "float32"        # parameters and optimizer state stay float32
  m.scan_layers = False            # python loop over blocks (as nanoGPT)
  m.remat = "none"                 # no activation checkpointing
  m.embed_init_scale = 0.02        # wte/wpe init std
  m.init_std = 0.02                # linear layers' init std
  m.residual_init_scaling = True   # c_proj init std 0.02 / sqrt(2 * n_layer)

  t = c.train = train_defaults()
  t.steps = 20 if smoke else 5000          # max_iters
  t.batch_size = 8 if smoke else 64
  t.seq_len = 32 if smoke else 256         # block_size
  t.lr = 1e-3
  t.min_lr = 1e-4
  t.warmup_steps = 2 if smoke else 100
  t.decay_steps = t.steps                  # lr_decay_iters = max_iters
  t.b1 = 0.9
  t.b2 = 0.99
  t.weight_decay = 0.1
  t.grad_clip = 1.0
  t.log_every = 5 if smoke else 10
  t.eval_every = 0 if smoke else 250
  t.ckpt_every = 10 if smoke else 250
  t.sample_tokens = 32 if smoke else 500
  t.sample_prompt_len = 8 if smoke else 16
  t.sample_temperature = 0.8
  t.sample_top_k = 200
  return c
