"""Optimizer: nanoGPT's schedule, the weight-decay mask, clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqmix.train import config as config_lib
from seqmix.train import optim
from seqmix.train import state as state_lib


def _nanogpt_lr(it, lr, min_lr, warmup, decay):
  # nanoGPT train.py get_lr, written out here as the oracle.
  if it < warmup:
    return lr * (it + 1) / (warmup + 1)
  if it > decay:
    return min_lr
  ratio = (it - warmup) / (decay - warmup)
  return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_lr_schedule_matches_nanogpt():
  sched = optim.lr_schedule(peak_lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=5000)
  for it in (0, 1, 50, 99, 100, 101, 2500, 4999, 5000, 6000):
    np.testing.assert_allclose(float(sched(it)), _nanogpt_lr(it, 1e-3, 1e-4, 100, 5000),
                               rtol=1e-6, err_msg=f"step {it}")


def test_decay_mask_excludes_norms_and_biases(tiny_model):
  params = state_lib.init_params(tiny_model, jax.random.PRNGKey(0),
                                 {"inputs": np.zeros((1, 4), np.int32)})
  mask = optim.decay_mask(params)
  assert mask["embed"]["embedding"] and mask["mix"]["kernel"] and mask["head"]["kernel"]
  assert not mask["mix"]["bias"] and not mask["head"]["bias"]
  assert not mask["norm"]["scale"] and not mask["norm"]["bias"]
  no_emb = optim.decay_mask(params, decay_embeddings=False)
  assert not no_emb["embed"]["embedding"] and no_emb["mix"]["kernel"]


def test_weight_decay_applies_only_where_masked(tiny_model):
  # With zero gradients AdamW's update is the decay term alone: -lr * wd * p.
  params = state_lib.init_params(tiny_model, jax.random.PRNGKey(0),
                                 {"inputs": np.zeros((1, 4), np.int32)})
  params = jax.tree.map(lambda p: p + 0.5, params)  # biases/norm offsets nonzero
  cfg = config_lib.train_defaults()
  cfg.update(lr=0.1, min_lr=0.1, warmup_steps=0, decay_steps=10, weight_decay=0.5,
             grad_clip=0.0)
  tx = optim.make_optimizer(cfg)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  lr0 = 0.1 * 1 / 1  # warmup_steps=0 -> schedule(0) = peak
  np.testing.assert_allclose(updates["mix"]["kernel"], -lr0 * 0.5 * params["mix"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_array_equal(updates["mix"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)


def test_grad_clip_bounds_global_norm():
  cfg = config_lib.train_defaults()
  cfg.update(lr=1.0, min_lr=1.0, warmup_steps=0, decay_steps=10, weight_decay=0.0,
             grad_clip=1.0)
  tx = optim.make_optimizer(cfg)
  params = {"w": jnp.ones((3, 3))}
  clip = optax.clip_by_global_norm(1.0)
  g = {"w": jnp.full((3, 3), 10.0)}
  clipped, _ = clip.update(g, clip.init(params))
  np.testing.assert_allclose(float(optax.global_norm(clipped)), 1.0, rtol=1e-6)
  assert isinstance(tx, optax.GradientTransformation)
