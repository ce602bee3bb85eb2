"""DCMHA: against a float64 dense loop (per query/key pair: raw logits of every head, composed by
the H x H matrices of the pre step, causal softmax, composed again on the probabilities), zero
dynamic weights give plain MHA, decoding (token by token, split prefill, window ring) == the
parallel form, causality, config errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.dcmha import DCMHA
from seqmix.mixers.attention.mha import MHA
from seqmix.testing import RTOL, assert_rel_close, rel_err

from _remapped_oracle import rope64

D = 32
DYNAMIC = ("dyn_w2", "dyn_dd", "static_w")


def _params(mod, x, std=0.5):
  """init params with the zero-initialised composition weights drawn N(0, std²), so every
  term of the composition moves the output."""
  params = dict(mt.init_params(mod, x))
  rng = np.random.default_rng(11)
  for name in DYNAMIC:
    params[name] = jnp.asarray(std * rng.standard_normal(params[name].shape), jnp.float32)
  return params


def _gelu64(a):
  return 0.5 * a * (1.0 + np.vectorize(math.erf)(a / math.sqrt(2.0)))


def _oracle(params, x, *, rope=True, window=None):
  """y [B,T,D] in float64, straight from the paper's composition on dense [H, T, T] scores."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  q = np.einsum("btd,dhk->bthk", x, p["q_proj"]["kernel"])
  k = np.einsum("btd,dhk->bthk", x, p["k_proj"]["kernel"])
  v = np.einsum("btd,dhk->bthk", x, p["v_proj"]["kernel"])
  h, dh = q.shape[2], q.shape[3]
  r = p["dyn_w2"].shape[2] // 2
  if rope:
    q = np.stack([[[rope64(q[bi, i, hi], i) for hi in range(h)] for i in range(t)]
                  for bi in range(b)])
    k = np.stack([[[rope64(k[bi, i, hi], i) for hi in range(h)] for i in range(t)]
                  for bi in range(b)])

  def dyn(bi, tok, n):
    """M_n(token) [H, H] for weight set n (0 pre-q, 1 pre-k, 2 post-q, 3 post-k)."""
    hid = _gelu64(x[bi, tok] @ p["dyn_w1"][:, n])                    # [C]
    ab = hid @ p["dyn_w2"][n].reshape(hid.shape[0], -1)
    ab = ab.reshape(2 * r, h)
    a, bb = ab[:r], ab[r:]
    a = a / np.sqrt(np.mean(a * a, -1, keepdims=True) + 1e-6)
    d = np.tanh(x[bi, tok] @ p["dyn_dd"][:, n])
    return a.T @ bb + np.diag(d)

  eye = np.eye(h)
  o = np.zeros(q.shape)
  for bi in range(b):
    for i in range(t):
      keys = [j for j in range(i + 1) if window is None or j > i - window]
      raw = np.array([[q[bi, i, g] @ k[bi, j, g] / math.sqrt(dh) for j in keys]
                      for g in range(h)])                            # [g, keys]
      c_pre = [eye + p["static_w"][0] + dyn(bi, i, 0) + dyn(bi, j, 1) for j in keys]
      c_post = [eye + p["static_w"][1] + dyn(bi, i, 2) + dyn(bi, j, 3) for j in keys]
      logits = np.array([[sum(raw[g, n] * c_pre[n][g, hh] for g in range(h))
                          for n in range(len(keys))] for hh in range(h)])   # [h, keys]
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      for hh in range(h):
        for n, j in enumerate(keys):
          w = sum(probs[g, n] * c_post[n][g, hh] for g in range(h))
          o[bi, i, hh] += w * v[bi, j, hh]
  return np.einsum("bthk,hkd->btd", o, p["o_proj"]["kernel"])


@pytest.mark.parametrize("kw", [dict(num_heads=4), dict(num_heads=2, rank=1, window=5,
                                                      position="none", dyn_hidden=6)],
                         ids=["rope", "window_nope"])
def test_matches_dense_composition_formula(kw):
  mod = DCMHA(d_model=D, **kw)
  x = mt.random_inputs(4, 2, 12)
  params = _params(mod, x)
  y, _ = jax.jit(lambda p_, x_: mod.apply({"params": p_}, x_))(params, x)
  want = _oracle(params, x, rope=kw.get("position", "rope") == "rope", window=kw.get("window"))
  assert_rel_close(y, want, RTOL["float32"], "dcmha vs dense formula")


def test_zero_dynamic_weights_is_mha():
  """With the composition weights zero (their init), the layer is MHA with the same q/k/v/o."""
  mod = DCMHA(d_model=D, num_heads=4)
  x = mt.random_inputs(1, 2, 10)
  params = dict(mt.init_params(mod, x))
  for name in DYNAMIC:
    params[name] = jnp.zeros_like(params[name])
  fwd = jax.jit(lambda p_: mod.apply({"params": p_}, x)[0])
  y = fwd(params)
  mha = MHA(d_model=D, num_heads=4)
  base = {n: params[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
  y_mha = jax.jit(lambda p_: mha.apply({"params": p_}, x)[0])(base)
  assert_rel_close(y, y_mha, RTOL["float32"], "dcmha(0) vs mha")
  assert rel_err(fwd(_params(mod, x)), y) > 1e-2, "composition has no effect"


def test_decode_matches_parallel():
  """Window 3 with QK-norm (the shared protocol tests decode the full-context test_kwargs)."""
  mod = DCMHA(d_model=D, num_heads=4, window=3, qk_norm=True)
  x = mt.random_inputs(5, 2, 11)
  run = mt.Runner(mod, _params(mod, x))
  y, _ = run(x)
  assert_rel_close(run.decode(x), y, RTOL["float32"], "token by token")
  assert_rel_close(run.decode(x, chunks=[4, 7]), y, RTOL["float32"], "split prefill")


def test_causal():
  mod = DCMHA(d_model=D, num_heads=4)
  x = mt.random_inputs(3, 2, 8)
  mt.check_causal(mod, _params(mod, x), x)


@pytest.mark.parametrize("kw,match", [(dict(num_kv_heads=2), "num_kv_heads"),
                                      (dict(position="alibi"), "position"),
                                      (dict(attn_dropout=0.1), "attn_dropout"),
                                      (dict(rank=0), "rank")])
def test_bad_config(kw, match):
  with pytest.raises(ValueError, match=match):
    DCMHA(d_model=D, num_heads=4, **kw).init_cache(1, 4)
