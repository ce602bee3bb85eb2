"""MQAR (multi-query associative recall) as zoology's Figure 2.

Launch one point of the grid:
  python -m experiments.train --config experiments/configs/mqar.py:mixer=mha,T=256,d=128,lr=1e-3 \
      --workdir runs/mqar_mha_T256_d128
Smoke (CPU, seconds):
  python -m experiments.train --config experiments/configs/mqar.py:mixer=mha,smoke \
      --workdir /tmp/mqar_smoke
Arguments: mixer (registry name, default mha), T in {64, 128, 256, 512} (pairs 4, 8, 16,
64), d (d_model) in {64, 128, 256, 512}, lr (zoology sweeps np.logspace(-4, -2, 4)), smoke.

As zoology: 2 layers, no MLP, vocabulary 8192, 100,000 training and 3,000 test examples
(power_a 0.01, no random filler tokens), batch 512 (T <= 128), 256 (T = 256) or 128
(T = 512), 64 epochs, AdamW (torch defaults: b2 0.999, weight decay 0.01) with cosine decay
to 0 and no warmup, no gradient clipping, LayerNorm, tied embeddings; softmax attention
with 1 head and learned absolute positions (other mixers: none), early stop at 99%
validation accuracy (token-level over the scored positions, zoology's metric).
Differences: zoology applies embedding dropout 0.1 (attention dropout 0.1); the seqmix
model has one dropout rate for the embedding and residual branches, set to 0 here. torch
AdamW decays every parameter; seqmix never decays norms and biases.
"""

import ml_collections

from experiments.configs import common
from seqmix import registry
from seqmix.train.config import train_defaults

PAIRS = {64: 4, 128: 8, 256: 16, 512: 64}
BATCH = {64: 512, 128: 512, 256: 256, 512: 128}
NUM_TRAIN, NUM_TEST, EPOCHS = 100_000, 3_000, 64


def _fit_heads(mixer: str, d: int) -> dict:
  """{mixer: {"num_heads": h}} with h the largest divisor of d up to the mixer's default
  head count, when that default does not divide d (e.g. Hedgehog's 12 heads at d = 128)."""
  if mixer not in registry.names():
    return {}
  default = getattr(registry.get(mixer).cls, "num_heads", None)
  if not isinstance(default, int) or d % default == 0:
    return {}
  return {mixer: {"num_heads": max(h for h in range(1, default + 1) if d % h == 0)}}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args, flags = common.parse_arg(arg, {"mixer": "mha", "T": 64, "d": 64, "lr": 1e-3})
  smoke = "smoke" in flags
  mixer, seq_len, d = args["mixer"], args["T"], args["d"]
  if seq_len not in PAIRS:
    raise ValueError(f"mqar T={seq_len}; choose one of {sorted(PAIRS)} (zoology Fig. 2).")
  c = ml_collections.ConfigDict()
  c.seed = 0  # model init, dropout and training-set seed (test set: seed + 10)

  c.data = ml_collections.ConfigDict()
  c.data.name = "mqar"
  c.data.vocab_size = 64 if smoke else 8192   # V: keys [1, V/2), values [V/2, V)
  c.data.num_kv_pairs = 2 if smoke else PAIRS[seq_len]  # key-value pairs per example
  c.data.num_train_examples = 256 if smoke else NUM_TRAIN  # fixed training set
  c.data.num_test_examples = 64 if smoke else NUM_TEST     # test set (whole split evaluated)
  c.data.power_a = 0.01                       # query gap power law (zoology)
  c.data.random_non_queries = False           # zoology Fig. 2: no random filler tokens

  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 0                  # 0: from the data (V)
  m.d_model = 32 if smoke else d    # width
  m.n_layers = 2                    # zoology attention baseline: 2 layers
  m.mixer = mixer                   # registry name
  # 1 head for softmax attention, no rotary (learned absolute positions instead)
  m.mixer_kwargs = ({"mha": {"num_heads": 1, "position": "none"}} if mixer == "mha"
                    else _fit_heads(mixer, m.d_model))
  if mixer == "cosformer":
    # cosFormer's re-weighting horizon M is the sequence length in the paper; the mixer's
    # default (2048) would flatten cos(pi (i - j) / 2M) to >= 0.98 over T = 256.
    m.mixer_kwargs = {mixer: {**m.mixer_kwargs.get(mixer, {}), "max_len": seq_len}}
  m.mlp = "none"                    # zoology: state_mixer = Identity
  m.norm = "layernorm"              # zoology's LayerNorm
  m.norm_eps = 1e-5                 # torch default
  m.use_bias = True                 # torch LayerNorm/Linear default bias
  m.tie_embeddings = True           # zoology ties the head to the embedding
  # zoology gives attention learned positions; so do mixers with no position information of
  # their own (registry needs_positions, e.g. the plain linear transformer)
  needs_pos = mixer == "mha" or (mixer in registry.names()
                                 and registry.get(mixer).needs_positions)
  m.pos_embedding = "learned" if needs_pos else "none"
  m.max_len = 16 if smoke else seq_len  # learned position table size
  m.dropout = 0.0                   # see the docstring
  m.dtype = "float32"               # compute dtype
  m.param_dtype = "float32"         # parameter dtype

  t = c.train = train_defaults()
  t.seq_len = 16 if smoke else seq_len
  t.batch_size = 16 if smoke else BATCH[seq_len]
  steps_per_epoch = max(1, c.data.num_train_examples // t.batch_size)
  t.steps = 30 if smoke else EPOCHS * steps_per_epoch
  t.lr = 3e-3 if smoke else args["lr"]
  t.min_lr = 0.0                    # cosine to 0 (torch CosineAnnealingLR eta_min=0)
  t.warmup_steps = 0                # no warmup
  t.decay_steps = t.steps
  t.b1 = 0.9
  t.b2 = 0.999                      # torch AdamW default
  t.weight_decay = 0.01             # torch AdamW default
  t.grad_clip = 0.0                 # zoology does not clip
  t.log_every = 10 if smoke else 50
  t.eval_every = 0 if smoke else steps_per_epoch  # once per epoch
  t.ckpt_every = 0 if smoke else steps_per_epoch
  t.early_stop_accuracy = 0.99      # zoology's early stopping threshold
  return c
