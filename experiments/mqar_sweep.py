"""MQAR accuracy of many mixers at one zoology setting, best of several learning rates.

  python -m experiments.mqar_sweep --mixers=mha,gla,mamba2 [--T=256 --d=128 --steps=2000]

The model is experiments/configs/mqar.py's (2 layers, no MLP, V=8192, tied embeddings;
learned positions for softmax attention only) with each mixer's default hyperparameters.
For each mixer the learning rates in --lrs train side by side as one vmapped model (one
compilation per mixer) for a fixed budget of --steps AdamW steps (b2 0.999, weight decay
0.01, cosine to 0, no warmup) on batches of --batch drawn from a fixed training set of
--train_examples; accuracy is token-level over the scored positions of 3,000 test
examples (zoology's metric), taken at the end. Prints a table, writes results.json and a
plot to --out.
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

from experiments.configs import mqar as mqar_config
from seqmix import registry
from seqmix.data import mqar as mqar_data
from seqmix.train import loop
from seqmix.train import optim

_MIXERS = flags.DEFINE_list("mixers", ["mha"], "Registry names.")
_T = flags.DEFINE_integer("T", 256, "Sequence length (pairs from zoology's table).")
_D = flags.DEFINE_integer("d", 128, "d_model.")
_LRS = flags.DEFINE_list("lrs", ["3e-4", "1e-3", "3e-3"], "Learning rates (best is kept).")
_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps per run (the fixed budget).")
_BATCH = flags.DEFINE_integer("batch", 256, "Batch size.")
_TRAIN = flags.DEFINE_integer("train_examples", 100_000, "Training-set size.")
_TEST = flags.DEFINE_integer("test_examples", 3_000, "Test-set size.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 100, "Test examples per accuracy call.")
_VMAP_LRS = flags.DEFINE_bool(
    "vmap_lrs", True, "Train the learning rates side by side as one vmapped model (False: one "
    "after another, a third of the memory; for mixers with large states at batch 256).")
_OUT = flags.DEFINE_string("out", "out/mqar_sweep", "Output folder.")
_STEPS_PER_CALL = 100


def _scored(inputs, targets):
  """(inputs [N,T], positions [N,P], targets [N,P]): the P scored positions of each example
  (padded with target -100 where an example has fewer), so logits are formed only there."""
  mask = targets != mqar_data.IGNORE
  p = int(mask.sum(1).max())
  pos = np.argsort(~mask, axis=1, kind="stable")[:, :p].astype(np.int32)   # scored first
  return inputs, pos, np.take_along_axis(targets, pos, axis=1)


def _loss(model, params, x, pos, y):
  logits, _ = model.apply({"params": params}, x, deterministic=True, logit_positions=pos)
  mask = y != mqar_data.IGNORE
  ll = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(ll, jnp.where(mask, y, 0)[..., None], -1)[..., 0]
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


def run_mixer(name, train, test, lrs):
  cfg = mqar_config.get_config(f"mixer={name},T={_T.value},d={_D.value}")
  model = loop.build_model(cfg.model, cfg.data.vocab_size)
  x_tr, p_tr, y_tr = (jnp.asarray(a) for a in _scored(*train))
  n_lr = len(lrs)
  keys = jax.random.split(jax.random.PRNGKey(_SEED.value), n_lr)
  params = jax.vmap(lambda k: model.init(k, x_tr[:2])["params"])(keys)
  tx = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999),
                   optax.add_decayed_weights(0.01, mask=optim.decay_mask),
                   optax.scale_by_schedule(optax.cosine_decay_schedule(1.0, _STEPS.value)))
  opt_state = jax.vmap(tx.init)(params)
  lrs = jnp.asarray(lrs, jnp.float32)

  def one(carry, key):
    params, opt_state = carry
    idx = jax.random.randint(key, (_BATCH.value,), 0, x_tr.shape[0])
    x, pos, y = x_tr[idx], p_tr[idx], y_tr[idx]

    def upd(p, s, lr):
      loss, g = jax.value_and_grad(lambda p: _loss(model, p, x, pos, y))(p)
      u, s = tx.update(g, s, p)
      return jax.tree.map(lambda a, b: a - lr * b, p, u), s, loss
    params, opt_state, loss = jax.vmap(upd)(params, opt_state, lrs)
    return (params, opt_state), loss

  @jax.jit
  def many(params, opt_state, key):
    (params, opt_state), losses = jax.lax.scan(one, (params, opt_state),
                                               jax.random.split(key, _STEPS_PER_CALL))
    return params, opt_state, losses[-1]

  @jax.jit
  def correct(p, x, pos, y):
    logits, _ = model.apply({"params": p}, x, deterministic=True, logit_positions=pos)
    mask = y != mqar_data.IGNORE
    return jnp.sum((jnp.argmax(logits, -1) == y) & mask), jnp.sum(mask)

  t0 = time.time()
  key = jax.random.PRNGKey(_SEED.value + 1)
  loss = None
  for i in range(_STEPS.value // _STEPS_PER_CALL):
    params, opt_state, loss = many(params, opt_state, jax.random.fold_in(key, i))
  # One learning rate at a time.
  hits, total = np.zeros(n_lr), 0
  x_te, p_te, y_te = _scored(*test)
  for j in range(n_lr):
    p = jax.tree.map(lambda a, j=j: a[j], params)
    total = 0
    for s in range(0, x_te.shape[0], _EVAL_BATCH.value):
      h, n = correct(p, *(jnp.asarray(a[s:s + _EVAL_BATCH.value]) for a in (x_te, p_te, y_te)))
      hits[j] += int(h)
      total += int(n)
  return hits / total, np.asarray(loss), time.time() - t0


def main(argv):
  del argv
  lrs = [float(x) for x in _LRS.value]
  pairs = mqar_config.PAIRS[_T.value]
  mcfg = mqar_data.MQARConfig(vocab_size=8192, seq_len=_T.value, num_kv_pairs=pairs,
                              power_a=0.01, random_non_queries=False)
  t0 = time.time()
  train = mqar_data.generate_mqar(mcfg, _TRAIN.value, _SEED.value)
  test = mqar_data.generate_mqar(mcfg, _TEST.value, _SEED.value + 10)
  print(f"MQAR T={_T.value} pairs={pairs} V=8192 d_model={_D.value}: data in "
        f"{time.time() - t0:.0f} s; {_STEPS.value} steps x batch {_BATCH.value}, lrs {lrs}; "
        f"device {jax.devices()[0].device_kind}", flush=True)
  os.makedirs(_OUT.value, exist_ok=True)
  results = {}
  for name in _MIXERS.value:
    try:
      registry.get(name)
      if _VMAP_LRS.value:
        acc, loss, secs = run_mixer(name, train, test, lrs)
      else:
        runs = [run_mixer(name, train, test, [lr]) for lr in lrs]
        acc, loss = (np.concatenate([r[i] for r in runs]) for i in (0, 1))
        secs = sum(r[2] for r in runs)
      results[name] = {"acc": acc.tolist(), "final_loss": loss.tolist(), "seconds": secs,
                       "best": float(acc.max()), "best_lr": lrs[int(acc.argmax())]}
      print(f"{name:<20} " + " ".join(f"{a:6.3f}" for a in acc) +
            f"  best {acc.max():.3f} @ {lrs[int(acc.argmax())]:g}  ({secs:.0f} s)", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
      print(f"{name:<20} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
      json.dump({"T": _T.value, "d_model": _D.value, "steps": _STEPS.value,
                 "batch": _BATCH.value, "lrs": lrs, "results": results}, f, indent=1)
  _plot(results)


def _plot(results):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ok = {k: v["best"] for k, v in results.items() if "best" in v}
  if not ok:
    return
  fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(ok) + 1), 3.2))
  ax.bar(list(ok), list(ok.values()))
  ax.set_ylabel("MQAR accuracy (best lr)")
  ax.set_ylim(0, 1)
  ax.set_title(f"MQAR T={_T.value}, d_model={_D.value}, {_STEPS.value} steps")
  plt.xticks(rotation=60, ha="right")
  fig.tight_layout()
  fig.savefig(os.path.join(_OUT.value, "mqar_sweep.png"), dpi=120)


if __name__ == "__main__":
  app.run(main)
