"""Passkey retrieval (Landmark Attention's task) at long contexts: the segment-memory models
against sliding-window attention.

  python -m experiments.passkey_memory \
      --models=mha_window,transformer_xl,infini_attention,memorizing,landmark,rmt \
      --train_T=1024 --eval_T=1024,2048,4096,8192,16384,32768 --steps=2000
  python -m experiments.passkey_memory --smoke        # a CPU run (~4 min on a shared 2-core box)

Every model is a 2-layer byte-level LM (d_model --d, SwiGLU MLP) trained with AdamW on
`seqmix.data.synthetic.PasskeyRetrieval` rows of --train_T bytes, then scored (exact match
of all the key's digits, argmax) on fresh rows of each --eval_T. Training and evaluation
both run through `seqmix.models.segment_recurrent.run_segments` with segments of
--segment_len tokens, so every model carries a bounded memory across segments and the
evaluation cost is linear in T:

  mha_window        mha with window = --segment_len (a ring KV cache; the baseline)
  transformer_xl    memory of mem_len = --segment_len hidden states, relative encoding
  infini_attention  local attention within the segment + compressive linear memory
  memorizing        local attention (segment + XL cache) + top-32 kNN over --memory_size tokens
  landmark          blocks of --block_len tokens gated by their landmark (grouped softmax;
                    a full KV cache: the last token of every block plays the landmark)
  rmt               --memory_tokens memory tokens carried across segments (BPTT over
                    --tbptt segments; None = all)

Prints one row per model and writes results.json to --out.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags

from seqmix.data import synthetic
from seqmix.models import lm
from seqmix.models import rmt
from seqmix.models import segment_recurrent as sr
from seqmix.train.step import token_stats

# Defined by define_flags() when the module runs as a script: importing it (the tests do)
# defines no absl flags, since several experiments share flag names.
_MODELS = _TRAIN_T = _EVAL_T = _SEG = _MEMORY = _BLOCK = _MEM_TOKENS = _TBPTT = None
_D = _HEADS = _STEPS = _BATCH = _LR = _EVAL_N = _SEED = _OUT = _SMOKE = None


def define_flags() -> None:
  global _MODELS, _TRAIN_T, _EVAL_T, _SEG, _MEMORY, _BLOCK, _MEM_TOKENS, _TBPTT
  global _D, _HEADS, _STEPS, _BATCH, _LR, _EVAL_N, _SEED, _OUT, _SMOKE
  _MODELS = flags.DEFINE_list(
      "models", ["mha_window", "transformer_xl", "infini_attention", "memorizing", "landmark",
                 "rmt"],
      "Models to compare.")
  _TRAIN_T = flags.DEFINE_integer("train_T", 1024, "Training length in bytes.")
  _EVAL_T = flags.DEFINE_list("eval_T", ["1024", "2048", "4096", "8192", "16384", "32768"],
                              "Evaluation lengths.")
  _SEG = flags.DEFINE_integer("segment_len", 256, "Segment length L (and the window of mha).")
  _MEMORY = flags.DEFINE_integer("memory_size", 4096, "memorizing's kNN memory size.")
  _BLOCK = flags.DEFINE_integer("block_len", 64, "landmark's block length.")
  _MEM_TOKENS = flags.DEFINE_integer("memory_tokens", 16, "rmt's memory tokens.")
  _TBPTT = flags.DEFINE_integer("tbptt", 0, "Truncate BPTT every k segments (0: never).")
  _D = flags.DEFINE_integer("d", 128, "d_model.")
  _HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
  _STEPS = flags.DEFINE_integer("steps", 2000, "Training steps.")
  _BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
  _LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate (cosine, 100 warmup steps).")
  _EVAL_N = flags.DEFINE_integer("eval_examples", 64, "Rows scored per evaluation length.")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed.")
  _OUT = flags.DEFINE_string("out", "experiments/results/passkey_memory", "Output folder.")
  _SMOKE = flags.DEFINE_bool("smoke", False, "Tiny CPU run: T 384/768, 20 steps, d 32.")


def build(name: str, seg_len: int, memory_size: int, memory_tokens: int, d: int, heads: int,
          block_len: int = 64):
  common = dict(vocab_size=256, d_model=d, n_layers=2)
  if name == "rmt":
    return rmt.RecurrentMemoryTransformer(num_memory_tokens=memory_tokens, mixer="mha",
                                          mixer_kwargs={"mha": {"num_heads": heads}}, **common)
  kwargs = {
      "mha_window": ("mha", {"num_heads": heads, "window": seg_len}),
      "transformer_xl": ("transformer_xl", {"num_heads": heads, "segment_len": seg_len,
                                            "mem_len": seg_len}),
      "infini_attention": ("infini_attention", {"num_heads": heads, "segment_len": seg_len}),
      "memorizing": ("memorizing", {"num_heads": heads, "segment_len": seg_len,
                                    "memory_size": memory_size,
                                    "top_k": min(32, memory_size)}),
      "landmark": ("landmark", {"num_heads": heads, "block_len": block_len}),
  }
  if name not in kwargs:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(kwargs) + ['rmt']}.")
  mixer, kw = kwargs[name]
  return lm.LanguageModel(mixer=mixer, mixer_kwargs={mixer: kw}, **common)


def run(name, cfg, train_t, eval_ts, steps, batch):
  model = build(name, cfg["segment_len"], cfg["memory_size"], cfg["memory_tokens"], cfg["d"],
                cfg["heads"], cfg["block_len"])
  seg_len, tbptt = cfg["segment_len"], cfg["tbptt"] or None

  def forward(params, inputs):
    return sr.run_segments(model, {"params": params}, inputs, segment_len=seg_len,
                           tbptt=tbptt)[0]

  src = synthetic.PasskeyRetrieval(seq_len=train_t, num_examples=steps * batch,
                                   seed=cfg["seed"])
  x0 = jnp.zeros((1, seg_len), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(cfg["seed"]), x0)["params"]
  sched = optax.warmup_cosine_decay_schedule(0.0, cfg["lr"], min(100, steps // 10 + 1), steps)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, inputs, targets):
    def loss(p):
      s, n, _ = token_stats(forward(p, inputs), targets)
      return s / jnp.maximum(n, 1.0)
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  t0 = time.time()
  for i in range(steps):
    rows = [src[i * batch + j] for j in range(batch)]
    inputs = jnp.asarray(np.stack([r["inputs"] for r in rows]))
    targets = jnp.asarray(np.stack([r["targets"] for r in rows]))
    params, opt_state, value = step(params, opt_state, inputs, targets)
  train_s = time.time() - t0

  fwd = jax.jit(forward)
  acc = {}
  for t in eval_ts:
    ev = synthetic.PasskeyRetrieval(seq_len=t, num_examples=cfg["eval_examples"],
                                    seed=cfg["seed"] + 1000 + t)
    inputs, targets = ev.arrays()
    hits = []
    for lo in range(0, len(inputs), batch):
      logits = fwd(params, jnp.asarray(inputs[lo:lo + batch]))
      tgt = targets[lo:lo + batch]
      pred = np.asarray(jnp.argmax(logits, -1))
      scored = tgt != -100
      hits.extend(np.all((pred == tgt) | ~scored, axis=1).tolist())
    acc[t] = float(np.mean(hits))
  return {"model": name, "final_train_loss": float(value), "train_s": train_s, "accuracy": acc}


def main(argv):
  del argv
  cfg = dict(segment_len=_SEG.value, memory_size=_MEMORY.value, memory_tokens=_MEM_TOKENS.value,
             block_len=_BLOCK.value,
             tbptt=_TBPTT.value, d=_D.value, heads=_HEADS.value, lr=_LR.value,
             eval_examples=_EVAL_N.value, seed=_SEED.value)
  train_t, eval_ts = _TRAIN_T.value, [int(t) for t in _EVAL_T.value]
  steps, batch = _STEPS.value, _BATCH.value
  if _SMOKE.value:
    cfg.update(segment_len=64, memory_size=64, memory_tokens=4, block_len=16, d=32, heads=2,
               eval_examples=4)
    train_t, eval_ts, steps, batch = 384, [384, 768], 20, 4
  results = []
  for name in _MODELS.value:
    r = run(name, cfg, train_t, eval_ts, steps, batch)
    results.append(r)
    cells = "  ".join(f"T={t}: {a:.2f}" for t, a in r["accuracy"].items())
    print(f"{name:18s} loss {r['final_train_loss']:.3f}  train {r['train_s']:.0f}s  {cells}",
          flush=True)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump({"config": {**cfg, "train_T": train_t, "eval_T": eval_ts, "steps": steps,
                          "batch": batch}, "results": results}, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
