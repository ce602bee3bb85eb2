"""Product-key top-k, PKM and PEER against direct formulas over all N = n² slots, and an LM
with mlp="pkm" / "peer" that decodes like its parallel form and trains."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqmix import registry
from seqmix.mixers import testing as mt
from seqmix.mixers.common import peer
from seqmix.mixers.common import pkm
from seqmix.mixers.common import product_keys
from seqmix.models import lm
from seqmix.testing import RTOL, assert_rel_close

D = 32


def _rand(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("n,k", [(5, 3), (4, 11), (7, 49)])
def test_product_key_topk_matches_full_search(n, k):
  h, kh = 3, 6
  q, keys = _rand(0, (2, 5, h, 2, kh)), _rand(1, (h, 2, n, kh))
  scores, idx = product_keys.product_key_topk(q, keys, k)
  s1 = np.einsum("bthk,hnk->bthn", q[..., 0, :], keys[:, 0])
  s2 = np.einsum("bthk,hnk->bthn", q[..., 1, :], keys[:, 1])
  full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], n * n)  # slot i·n + j
  want_idx = np.argsort(-full, axis=-1, kind="stable")[..., :k]
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  assert_rel_close(scores, np.take_along_axis(full, want_idx, axis=-1), RTOL["float32"],
                   "scores")


def _naive_weights(params, x, heads, key_dim, k):
  """Softmax over the top-k of the full n² score table, zero elsewhere: [B, T, H, N]."""
  q = np.einsum("btd,dhe->bthe", x, params["query"]["kernel"])
  q1, q2 = q[..., : key_dim // 2], q[..., key_dim // 2:]
  c = np.asarray(params["sub_keys"])  # [h, 2, n, kh]
  full = (np.einsum("bthk,hnk->bthn", q1, c[:, 0])[..., :, None]
          + np.einsum("bthk,hnk->bthn", q2, c[:, 1])[..., None, :])
  full = full.reshape(*full.shape[:-2], -1)
  kth = np.sort(full, axis=-1)[..., -k][..., None]
  e = np.where(full >= kth, np.exp(full - full.max(-1, keepdims=True)), 0.0)
  return e / e.sum(-1, keepdims=True)


def test_pkm_matches_naive():
  heads, key_dim, k = 2, 8, 5
  layer = pkm.ProductKeyMemory(hidden=20, heads=heads, topk=k, key_dim=key_dim)  # n=5, N=25
  x = _rand(2, (2, 7, D))
  params = mt.random_params(layer, x, std=0.5)
  assert params["values"].shape == (25, D)
  w = _naive_weights(params, np.asarray(x), heads, key_dim, k)
  want = np.einsum("bthn,nd->btd", w, params["values"])
  assert_rel_close(layer.apply({"params": params}, x), want, RTOL["float32"], "pkm")


def test_peer_matches_naive():
  heads, key_dim, k = 3, 6, 4
  layer = peer.PEER(hidden=36, heads=heads, topk=k, key_dim=key_dim)  # n=6, N=36
  x = _rand(3, (2, 7, D))
  params = mt.random_params(layer, x, std=0.5)
  w = _naive_weights(params, np.asarray(x), heads, key_dim, k)
  act = np.asarray(jax.nn.gelu(jnp.einsum("btd,nd->btn", x, params["down"]), approximate=False))
  want = np.einsum("bthn,btn,nd->btd", w, act, params["up"])
  assert_rel_close(layer.apply({"params": params}, x), want, RTOL["float32"], "peer")


def test_bad_key_dim_is_refused():
  with pytest.raises(ValueError, match="key_dim=5 must be even"):
    pkm.ProductKeyMemory(hidden=16, key_dim=5).init(jax.random.key(0), jnp.zeros((1, 2, D)))


V, T = 23, 12


@pytest.fixture(scope="module")
def mixer():
  return "mha", {"mha": dict(registry.get("mha").test_kwargs)}


def _model(mixer, mlp):
  name, kwargs = mixer
  return lm.LanguageModel(vocab_size=V, d_model=D, n_layers=1, mixer=name, mixer_kwargs=kwargs,
                          mlp=mlp, max_len=32)


def _tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (2, T)), jnp.int32)


@pytest.mark.parametrize("mlp", ["pkm", "peer"])
def test_lm_decode_matches_parallel(mixer, mlp):
  model = _model(mixer, mlp)
  tokens = _tokens()
  params = mt.random_params(model, tokens)
  fwd = jax.jit(lambda p, x, c=None: model.apply({"params": p}, x, cache=c))
  logits, _ = fwd(params, tokens)
  cache, out = model.init_cache(2, T), []
  for t in range(T):
    step, cache = fwd(params, tokens[:, t:t + 1], cache)
    out.append(step)
  assert_rel_close(jnp.concatenate(out, axis=1), logits, RTOL["float32"], f"{mlp} decode")


@pytest.mark.parametrize("mlp", ["pkm", "peer"])
def test_lm_trains(mlp):
  """A one-block model without token mixing, so the product-key layer is its only hidden
  layer: every parameter of the layer gets a non-zero gradient and the loss falls."""
  model = lm.LanguageModel(vocab_size=V, d_model=D, n_layers=1, mixer="none", mlp=mlp)
  tokens = _tokens(1)
  params = mt.random_params(model, tokens, std=0.05)
  opt = optax.adam(1e-2)

  def loss(p):
    logits, _ = model.apply({"params": p}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

  @jax.jit
  def step(p, s):
    val, g = jax.value_and_grad(loss)(p)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, val, g

  state, losses = opt.init(params), []
  for i in range(10):
    params, state, val, grads = step(params, state)
    losses.append(float(val))
    if i == 0:
      for path, g in jax.tree_util.tree_flatten_with_path((grads["block_0"]["mlp"]))[0]:
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, jax.tree_util.keystr(path)
  assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
