"""TTT-Linear / TTT-MLP layers: float64 primal oracles of the whole layers, init, config errors.

The protocol (causality, decoding at every length, split prefill, documents, gradients) runs for
both through tests/mixers/test_protocol.py (test_kwargs mini_batch=4 with T=13, so mini-batches
end mid-call and mid-document). Here TTT-Linear's and TTT-MLP's outputs are recomputed token by
token in numpy float64 from their parameters: the inner gradient of ½‖LN(f_res(k)) − (v − k)‖²
written out (for the MLP, back-propagated by hand through LN, W2, tanh-gelu and W1), the
mini-batch rule (gradients at the boundary weights, running τ-weighted sums), RoPE at the
position inside the mini-batch, post-norm and output projection.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.ttt import ttt_linear, ttt_mlp
from seqmix.ops import ttt as ttt_ops
from seqmix.testing import RTOL, assert_rel_close

D = mt.D_MODEL
# The mixer runs in float32 (the op's chunked dual form); the oracle in float64.
TOL = RTOL["float32"]


def _ln(z, eps):
  mu = z.mean(-1, keepdims=True)
  std = np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + eps)
  return (z - mu) / std, std


def _rope_rotate_half(a, pos, base=10000.0):
  """a [B, T, H, K], pos [T]: rotate-half RoPE."""
  k = a.shape[-1]
  theta = base ** (-np.arange(0, k, 2) / k)
  ang = pos[:, None] * theta                                     # [t, k/2]
  cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  a1, a2 = a[..., :k // 2], a[..., k // 2:]
  return np.concatenate([a1 * cos - a2 * sin, a2 * cos + a1 * sin], -1)


def _inner_linear(q, k, v, eta, tau, w0, b0, gamma, beta, mb):
  """One head, primal: q, k, v [T, K], eta [T] -> out [T, K]."""
  w, b = w0.copy(), b0[0].copy()
  gw, gb = np.zeros_like(w), np.zeros_like(b)
  out = np.zeros_like(q)
  for t in range(q.shape[0]):
    j = t % mb
    xh, std = _ln(k[t] @ w + b, ttt_ops.LN_EPS)
    gy = (gamma * xh + beta - (v[t] - k[t])) * gamma
    dz = (gy - gy.mean() - xh * (gy * xh).mean()) / std          # d½‖LN(z) − target‖²/dz
    gw += eta[t] * np.outer(k[t], dz)
    gb += eta[t] * dz
    w_t, b_t = w - tau[j] * gw, b - tau[j] * gb
    out[t] = q[t] + gamma * _ln(q[t] @ w_t + b_t, ttt_ops.LN_EPS)[0] + beta
    if j == mb - 1:
      w, b, gw, gb = w_t, b_t, np.zeros_like(w), np.zeros_like(b)
  return out


def test_ttt_linear_equals_primal_oracle():
  mb, h = 4, 2
  m = ttt_linear.TTTLinear(d_model=D, num_heads=h, mini_batch=mb)
  x = mt.random_inputs(0, 2, 11, D)
  params = mt.init_params(m, x)
  y = np.asarray(jax.jit(m.apply)({"params": params}, x)[0])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  kd = D // h
  heads = lambda a: a.reshape(b, t, h, kd)
  q, k, v = (heads(x @ p[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj"))
  pos = np.arange(t) % mb
  q, k = _rope_rotate_half(q, pos), _rope_rotate_half(k, pos)
  eta = 1.0 / (1.0 + np.exp(-(x @ p["ttt_lr_weight"].T + p["ttt_lr_bias"]))) / kd  # [b, t, h]
  tau = np.maximum(1.0 / np.arange(1, mb + 1) + p["learnable_token_idx"], 0.0)
  o = np.zeros((b, t, h, kd))
  for bi in range(b):
    for hi in range(h):
      o[bi, :, hi] = _inner_linear(q[bi, :, hi], k[bi, :, hi], v[bi, :, hi], eta[bi, :, hi], tau,
                                   p["W1"][hi], p["b1"][hi], p["ttt_norm_weight"][hi],
                                   p["ttt_norm_bias"][hi], mb)
  o = _ln(o.reshape(b, t, D), 1e-6)[0] * p["post_norm"]["scale"] + p["post_norm"]["bias"]
  assert_rel_close(y, o @ p["o_proj"]["kernel"], TOL, "ttt_linear vs primal oracle")


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _gelu_tanh_grad(x):
  c = np.sqrt(2.0 / np.pi)
  th = np.tanh(c * (x + 0.044715 * x ** 3))
  return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3 * 0.044715 * x * x)


def _inner_mlp(q, k, v, eta, tau, theta0, gamma, beta, mb):
  """One head, primal, TTT-MLP: f_res(x) = gelu(x W1 + b1) W2 + b2; q, k, v [T, K] -> [T, K].

  Each token's gradient of ½‖LN(f_res(k_t)) − (v_t − k_t)‖² at the boundary weights θ₀ is
  back-propagated by hand (LN, W2, gelu, W1); θ_t = θ₀ − τ_j Σ_{s<=t in the mini-batch} η_s ∇_s.
  """
  theta = [a.copy() for a in theta0]                              # W1 [K,M], b1 [M], W2, b2
  pending = [np.zeros_like(a) for a in theta]
  f_res = lambda x, th: _gelu_tanh(x @ th[0] + th[1]) @ th[2] + th[3]
  out = np.zeros_like(q)
  for t in range(q.shape[0]):
    j = t % mb
    w1, b1, w2, b2 = theta
    z1 = k[t] @ w1 + b1
    a1 = _gelu_tanh(z1)
    xh, std = _ln(a1 @ w2 + b2, ttt_ops.LN_EPS)
    gy = (gamma * xh + beta - (v[t] - k[t])) * gamma
    dz2 = (gy - gy.mean() - xh * (gy * xh).mean()) / std
    dz1 = (w2 @ dz2) * _gelu_tanh_grad(z1)
    grads = (np.outer(k[t], dz1), dz1, np.outer(a1, dz2), dz2)
    pending = [s + eta[t] * g for s, g in zip(pending, grads)]
    theta_t = [a - tau[j] * s for a, s in zip(theta, pending)]
    out[t] = q[t] + gamma * _ln(f_res(q[t], theta_t), ttt_ops.LN_EPS)[0] + beta
    if j == mb - 1:
      theta, pending = theta_t, [np.zeros_like(a) for a in theta]
  return out


def test_ttt_mlp_equals_primal_oracle():
  """T = 18 with mini-batches of 4: four full mini-batches, the last one cut at 2 tokens."""
  mb, h = 4, 2
  m = ttt_mlp.TTTMLP(d_model=D, num_heads=h, mini_batch=mb)
  x = mt.random_inputs(0, 2, 18, D)
  params = mt.init_params(m, x)
  # At init (std 0.02) the inner pre-activations k W1 are ~1e-2, where tanh-gelu is linear to
  # ~1e-6 relative: the gelu (and its derivative in the dual form) would go unchecked. The q/k/v
  # projections and the initial W1 ×10 put them at O(1), as in a trained layer.
  params = {**params, **{n: {"kernel": 10 * params[n]["kernel"]}
                         for n in ("q_proj", "k_proj", "v_proj")}, "W1": 10 * params["W1"]}
  y = np.asarray(jax.jit(m.apply)({"params": params}, x)[0])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  kd = D // h
  heads = lambda a: a.reshape(b, t, h, kd)
  q, k, v = (heads(x @ p[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj"))
  pos = np.arange(t) % mb
  q, k = _rope_rotate_half(q, pos), _rope_rotate_half(k, pos)
  eta = 0.1 / (1.0 + np.exp(-(x @ p["ttt_lr_weight"].T + p["ttt_lr_bias"]))) / kd  # [b, t, h]
  tau = np.maximum(1.0 / np.arange(1, mb + 1) + p["learnable_token_idx"], 0.0)
  assert np.abs(np.einsum("bthk,hkm->bthm", k, p["W1"])).max() > 1   # gelu's curved range

  def layer(eta):
    o = np.zeros((b, t, h, kd))
    for bi in range(b):
      for hi in range(h):
        theta0 = (p["W1"][hi], p["b1"][hi, 0], p["W2"][hi], p["b2"][hi, 0])
        o[bi, :, hi] = _inner_mlp(q[bi, :, hi], k[bi, :, hi], v[bi, :, hi], eta[bi, :, hi], tau,
                                  theta0, p["ttt_norm_weight"][hi], p["ttt_norm_bias"][hi], mb)
    o = _ln(o.reshape(b, t, D), 1e-6)[0] * p["post_norm"]["scale"] + p["post_norm"]["bias"]
    return o @ p["o_proj"]["kernel"]

  assert_rel_close(y, layer(eta), TOL, "ttt_mlp vs primal oracle")
  # The inner learning moves the output far beyond the tolerance, so a wrong inner gradient,
  # learning rate or mini-batch rule cannot pass.
  frozen = layer(np.zeros_like(eta))
  assert np.linalg.norm(y - frozen) > 1e3 * TOL * np.linalg.norm(frozen)


def _init(module):
  x = mt.random_inputs(0, 1, 4, D)
  return jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), x)
                                                ["params"]))


def test_ttt_init_matches_official_layer():
  p = _init(ttt_mlp.TTTMLP(d_model=D, num_heads=2, mini_batch=4))
  assert p["W1"].shape == (2, 16, 64) and p["W2"].shape == (2, 64, 16)
  assert not np.any(p["b1"]) and not np.any(p["b2"]) and not np.any(p["learnable_token_idx"])
  assert np.all(p["ttt_norm_weight"] == 1) and not np.any(p["ttt_norm_bias"])
  assert not np.any(p["ttt_lr_bias"]) and 0 < p["ttt_lr_weight"].std() < 0.03
  assert ttt_mlp.TTTMLP(d_model=D).ttt_base_lr == 0.1
  assert ttt_linear.TTTLinear(d_model=D).ttt_base_lr == 1.0


def test_ttt_gate_variant_runs_and_differs():
  kw = dict(d_model=D, num_heads=2, mini_batch=4)
  x = mt.random_inputs(1, 1, 6, D)
  gated = ttt_linear.TTTLinear(use_gate=True, **kw)
  params = mt.init_params(gated, x)
  assert "g_proj" in params
  y = jax.jit(gated.apply)({"params": params}, x)[0]
  plain = {k_: v_ for k_, v_ in params.items() if k_ != "g_proj"}
  y0 = jax.jit(ttt_linear.TTTLinear(**kw).apply)({"params": plain}, x)[0]
  assert np.all(np.isfinite(np.asarray(y))) and float(jnp.abs(y - y0).max()) > 0


def test_ttt_rejects_bad_config():
  x = jnp.ones((1, 3, D))
  with pytest.raises(ValueError, match="must be divisible by num_heads=3"):
    ttt_linear.TTTLinear(d_model=D, num_heads=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="ttt_base_lr=0"):
    ttt_mlp.TTTMLP(d_model=D, num_heads=2, ttt_base_lr=0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="mini_batch=0"):
    ttt_linear.TTTLinear(d_model=D, num_heads=2, mini_batch=0).init(jax.random.key(0), x)
