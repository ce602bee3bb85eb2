"""Tiny CPU MQAR for diagnosing one mixer option in minutes (issue 11, README "MQAR").

  python experiments/mqar_tiny_cpu.py gla '{"use_short_conv": true}' 3e-3 400

T=64, 4 key-value pairs, V=128, d_model=64, 2 layers, no MLP (experiments/configs/mqar.py's
model with the mixer's kwargs replaced), batch 32 from 20,000 fixed training examples, AdamW
(b2 0.999, wd 0.01, cosine to 0), accuracy over the scored positions of 1,000 test examples.
Prints one JSON line: (step, training loss, test accuracy) at each quarter of the run.
"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
from experiments.configs import mqar as mqar_config
from seqmix.data import mqar as mqar_data
from seqmix.train import loop, optim
from experiments.mqar_sweep import _scored, _loss
name, kw, lr, steps = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
T, P, V, D, B = 64, 4, 128, 64, 32
cfg = mqar_config.get_config(f"mixer={name},T={T},d={D}")
cfg.data.vocab_size = V
if kw: cfg.model.mixer_kwargs = {name: kw}
model = loop.build_model(cfg.model, V)
mc = mqar_data.MQARConfig(vocab_size=V, seq_len=T, num_kv_pairs=P, power_a=0.01, random_non_queries=False)
x_tr, p_tr, y_tr = (jnp.asarray(a) for a in _scored(*mqar_data.generate_mqar(mc, 20000, 0)))
x_te, p_te, y_te = (jnp.asarray(a) for a in _scored(*mqar_data.generate_mqar(mc, 1000, 10)))
params = model.init(jax.random.PRNGKey(0), x_tr[:2])["params"]
tx = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999), optax.add_decayed_weights(0.01, mask=optim.decay_mask),
                 optax.scale_by_schedule(optax.cosine_decay_schedule(lr, steps)), optax.scale(-1.0))
st = tx.init(params)
@jax.jit
def step(params, st, key):
  idx = jax.random.randint(key, (B,), 0, x_tr.shape[0])
  loss, g = jax.value_and_grad(lambda p: _loss(model, p, x_tr[idx], p_tr[idx], y_tr[idx]))(params)
  u, st = tx.update(g, st, params)
  return optax.apply_updates(params, u), st, loss
@jax.jit
def acc(p):
  logits, _ = model.apply({"params": p}, x_te, deterministic=True, logit_positions=p_te)
  m = y_te != mqar_data.IGNORE
  return jnp.sum((jnp.argmax(logits, -1) == y_te) & m) / jnp.sum(m)
t0 = time.time(); key = jax.random.PRNGKey(1); hist = []
for i in range(steps):
  params, st, loss = step(params, st, jax.random.fold_in(key, i))
  if (i + 1) % (steps // 4) == 0: hist.append((i + 1, round(float(loss), 3), round(float(acc(params)), 3)))
print(json.dumps({"mixer": name, "kw": kw, "lr": lr, "steps": steps, "hist": hist, "s": round(time.time() - t0)}), flush=True)
