"""Test-time training layers: TTT-Linear and TTT-MLP (Sun et al. 2024, "Learning to (Learn at
Test Time): RNNs with Expressive Hidden States").

The hidden state of each head is the weights of an inner model `f_res` (TTT-Linear:
`f_res(x) = x W + b`; TTT-MLP: `f_res(x) = gelu(x W1 + b1) W2 + b2`, hidden width 4K, tanh-gelu)
wrapped as `f(x) = x + LN(f_res(x))`, where LN is a per-head LayerNorm over K (population
variance, eps 1e-6) with learnable `ln_weight`, `ln_bias` `[H, K]`. The inner model is trained
while the sequence is read, by mini-batch gradient descent on the self-supervised loss

    l_s(θ) = ½ ‖LN(f_res(k_s; θ)) - (v_s - k_s)‖²        (reconstruct the value view from the
                                                          key view: f(k_s) ≈ v_s)

Mini-batches are consecutive groups of `b = mini_batch` tokens, aligned to the start of the
sequence (token p, counted from the first token the state ever saw, is at position p mod b of
mini-batch p // b). Inside a mini-batch every gradient is taken at the weights θ₀ of the last
completed mini-batch boundary, and token t (position j in its mini-batch) reads with

    θ_t = θ₀ - τ_j Σ_{s in the mini-batch, s <= t} eta_s ∇l_s(θ₀)
    out_t = q_t + LN(f_res(q_t; θ_t))

where `eta [B, T, H]` is the per-token learning rate (the official layer passes
`base_lr · sigmoid(x·w_lr + b_lr) / K`) and `τ [b]` the per-position scale (`token_scale`;
default `1 / (j + 1)`, i.e. the running mean of the mini-batch's gradients; the official layer
learns an additive offset, clamped at 0 — that belongs to the mixer). At the end of a
mini-batch θ₀ ← θ at its last token. This is the official ttt-lm-jax / ttt-lm-pytorch
computation; a sequence whose length is not a multiple of b ends inside a mini-batch.

State (float32, a NamedTuple, accepted and returned by every impl so that prefill, split
prefill and single-token decoding chain exactly): the weights θ₀ at the last completed boundary,
the η-weighted gradient sums `Σ eta_s ∇l_s(θ₀)` of the tokens already read in the current
(incomplete) mini-batch — exactly what is needed to finish it, since every gradient of a
mini-batch is taken at θ₀ — and `count [B]` int32, the number of those tokens (0 <= count < b).
`TTTLinearState(w [B,H,K,K], b [B,H,1,K], w_grad, b_grad, count)`;
`TTTMLPState(w1 [B,H,K,4K], b1 [B,H,1,4K], w2 [B,H,4K,K], b2 [B,H,1,K], w1_grad, b1_grad,
w2_grad, b2_grad, count)` (grads shaped like their weights). `linear_state` / `mlp_state` tile
per-head initial weights (the mixer's learnable parameters) over the batch. `initial_state=None`
means zero weights, zero pending gradients, count 0.

Forms (`impl`):
  reference  token-by-token float32 `lax.scan` over the state above; each token's inner
             gradient is `jax.grad` of the inner loss (the primal form, the oracle).
  chunked    the mini-batch dual form of the paper (Sec. 2.5): per mini-batch, with G the
             closed-form gradient of the loss w.r.t. the inner pre-activations Z at θ₀ and
             E[t, s] = τ_t eta_s (s <= t, else 0),
               Z̄ = Q W₀ + b₀ - τ ⊙ (Q W_grad + b_grad) - (E ⊙ (Q Kᵀ + 1)) G
             (per layer for TTT-MLP, the second layer reading gelu(Z̄₁) against gelu(Z₁)), so
             the b per-token weights are never formed; a `lax.scan` carries (θ₀, pending grads)
             across mini-batches. A state entering mid-mini-batch (count > 0) is handled by
             shifting the sequence right by count inside a zero-padded buffer, so mini-batches
             stay aligned; padded tokens have eta = 0 and contribute nothing.
  pallas     not built.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqmix.ops._impl import resolve

_AVAILABLE = {"reference": True, "chunked": True, "pallas": False}
_AUTO = {"default": "chunked"}

_HIGHEST = jax.lax.Precision.HIGHEST
LN_EPS = 1e-6
MLP_RATIO = 4


class TTTLinearState(NamedTuple):
  """TTT-Linear state: weights at the last mini-batch boundary + the pending mini-batch."""
  w: jax.Array        # [B, H, K, K]
  b: jax.Array        # [B, H, 1, K]
  w_grad: jax.Array   # [B, H, K, K]   sum of eta_s dl_s/dW over the pending tokens
  b_grad: jax.Array   # [B, H, 1, K]
  count: jax.Array    # [B] int32, tokens read in the current mini-batch (< mini_batch)


class TTTMLPState(NamedTuple):
  """TTT-MLP state: weights at the last mini-batch boundary + the pending mini-batch."""
  w1: jax.Array       # [B, H, K, 4K]
  b1: jax.Array       # [B, H, 1, 4K]
  w2: jax.Array       # [B, H, 4K, K]
  b2: jax.Array       # [B, H, 1, K]
  w1_grad: jax.Array
  b1_grad: jax.Array
  w2_grad: jax.Array
  b2_grad: jax.Array
  count: jax.Array    # [B] int32


def linear_state(w, b, batch_size: int) -> TTTLinearState:
  """Fresh TTT-Linear state from per-head weights `w [H, K, K]`, `b [H, 1, K]`."""
  params = tuple(jnp.broadcast_to(x.astype(jnp.float32), (batch_size,) + x.shape)
                 for x in (w, b))
  zeros = tuple(jnp.zeros_like(x) for x in params)
  return TTTLinearState(*params, *zeros, jnp.zeros((batch_size,), jnp.int32))


def mlp_state(w1, b1, w2, b2, batch_size: int) -> TTTMLPState:
  """Fresh TTT-MLP state from per-head weights `w1 [H,K,4K]`, `b1 [H,1,4K]`, `w2 [H,4K,K]`,
  `b2 [H,1,K]`."""
  params = tuple(jnp.broadcast_to(x.astype(jnp.float32), (batch_size,) + x.shape)
                 for x in (w1, b1, w2, b2))
  zeros = tuple(jnp.zeros_like(x) for x in params)
  return TTTMLPState(*params, *zeros, jnp.zeros((batch_size,), jnp.int32))


def ttt_linear(q, k, v, eta, ln_weight, ln_bias, *, token_scale=None, initial_state=None,
               mini_batch: int = 16, impl: str = "auto"):
  """TTT-Linear over a sequence.

  Args:
    q, k, v: the query, key and value views `[B, T, H, K]` (one width K: f(x) = x + ...).
    eta: per-token inner learning rates `[B, T, H]` (base lr, gate and 1/K already applied).
    ln_weight, ln_bias: the inner LayerNorm's scale and shift `[H, K]`.
    token_scale: `[mini_batch]` scale τ_j of position j in a mini-batch; default `1 / (j+1)`.
    initial_state: a `TTTLinearState` (see `linear_state`) or None (zero weights).
    mini_batch: tokens per inner mini-batch (the paper's b = 16).
    impl: "reference" | "chunked" | "pallas" (not built) | "auto".

  Returns:
    (out `[B, T, H, K]` in the dtype of v, final `TTTLinearState`, float32 with int32 count).
  """
  bsz, _, h, dk = q.shape
  if initial_state is None:
    initial_state = linear_state(jnp.zeros((h, dk, dk)), jnp.zeros((h, 1, dk)), bsz)
  _check("ttt_linear", q, k, v, eta, ln_weight, ln_bias, token_scale, mini_batch)
  _check_state("ttt_linear", initial_state, TTTLinearState,
               ((dk, dk), (1, dk), (dk, dk), (1, dk)), bsz, h)
  out, params, grads, count = _run("ttt_linear", _LINEAR, q, k, v, eta, ln_weight, ln_bias,
                                   token_scale, initial_state, mini_batch, impl)
  return out, TTTLinearState(*params, *grads, count)


def ttt_mlp(q, k, v, eta, ln_weight, ln_bias, *, token_scale=None, initial_state=None,
            mini_batch: int = 16, impl: str = "auto"):
  """TTT-MLP over a sequence: as `ttt_linear` with `f_res(x) = gelu(x W1 + b1) W2 + b2`.

  The state is a `TTTMLPState` (see `mlp_state`; hidden width 4K); None means zero weights
  (then gelu'(0) W2 = 0 and only b2 learns in the first mini-batch).
  """
  bsz, _, h, dk = q.shape
  dm = MLP_RATIO * dk
  if initial_state is None:
    initial_state = mlp_state(jnp.zeros((h, dk, dm)), jnp.zeros((h, 1, dm)),
                              jnp.zeros((h, dm, dk)), jnp.zeros((h, 1, dk)), bsz)
  _check("ttt_mlp", q, k, v, eta, ln_weight, ln_bias, token_scale, mini_batch)
  shapes = ((dk, dm), (1, dm), (dm, dk), (1, dk))
  _check_state("ttt_mlp", initial_state, TTTMLPState, shapes + shapes, bsz, h)
  out, params, grads, count = _run("ttt_mlp", _MLP, q, k, v, eta, ln_weight, ln_bias,
                                   token_scale, initial_state, mini_batch, impl)
  return out, TTTMLPState(*params, *grads, count)


def _check(op, q, k, v, eta, ln_weight, ln_bias, token_scale, mini_batch):
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"{op}: q, k and v must all be [B, T, H, K] (one width: the output is "
                     f"q + LN(f(q))); got {q.shape=} {k.shape=} {v.shape=}.")
  if eta.shape != q.shape[:3]:
    raise ValueError(f"{op}: eta must be [B, T, H] = {q.shape[:3]}; got {eta.shape}.")
  for name, x in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
    if x.shape != q.shape[2:]:
      raise ValueError(f"{op}: {name} must be [H, K] = {q.shape[2:]}; got {x.shape}.")
  if mini_batch < 1:
    raise ValueError(f"{op}: mini_batch must be positive; got {mini_batch}.")
  if token_scale is not None and token_scale.shape != (mini_batch,):
    raise ValueError(f"{op}: token_scale must be [mini_batch] = ({mini_batch},); "
                     f"got {token_scale.shape}.")


def _check_state(op, state, cls, shapes, bsz, h):
  if not isinstance(state, cls):
    raise ValueError(f"{op}: initial_state must be a {cls.__name__} (build one with "
                     f"{'linear_state' if cls is TTTLinearState else 'mlp_state'}); "
                     f"got {type(state).__name__}.")
  for name, x, shape in zip(cls._fields, state, shapes):
    if x.shape != (bsz, h) + shape:
      raise ValueError(f"{op}: initial_state.{name} must be {(bsz, h) + shape}; got {x.shape}.")
  if state.count.shape != (bsz,):
    raise ValueError(f"{op}: initial_state.count must be [B] = ({bsz},); got {state.count.shape}.")


def _layer_norm(z, gamma, beta):
  """LN over the last axis (population variance, eps LN_EPS); returns (y, x_hat, std)."""
  mu = jnp.mean(z, axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.mean(jnp.square(z - mu), axis=-1, keepdims=True) + LN_EPS)
  x_hat = (z - mu) / std
  return gamma * x_hat + beta, x_hat, std


def _ln_l2_grad(z, target, gamma, beta):
  """d/dz of ½‖LN(z) - target‖², row-wise (the LayerNorm backward written out)."""
  y, x_hat, std = _layer_norm(z, gamma, beta)
  g_hat = (y - target) * gamma
  d = z.shape[-1]
  return (g_hat - jnp.sum(g_hat, -1, keepdims=True) / d
          - x_hat * jnp.sum(g_hat * x_hat, -1, keepdims=True) / d) / std


def _gelu(x):
  return jax.nn.gelu(x, approximate=True)


def _gelu_grad(x):
  """Derivative of the tanh-approximated gelu."""
  c = jnp.sqrt(2.0 / jnp.pi).astype(x.dtype)
  th = jnp.tanh(c * (x + 0.044715 * x ** 3))
  return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3 * 0.044715 * x * x)


class _Model(NamedTuple):
  """One inner model: its function (for the oracle) and its dual mini-batch step."""
  apply: callable      # (params, x [.., K]) -> [.., K]
  dual: callable       # see _linear_dual


def _linear_apply(params, x):
  w, b = params
  return jnp.matmul(x, w, precision=_HIGHEST) + b[0]


def _mlp_apply(params, x):
  w1, b1, w2, b2 = params
  x2 = _gelu(jnp.matmul(x, w1, precision=_HIGHEST) + b1[0])
  return jnp.matmul(x2, w2, precision=_HIGHEST) + b2[0]


def _dual_layer(x_q, x_k, w, b, w_grad, b_grad, g, tau, e):
  """One linear layer of the dual form: Z̄ [C, O], the layer's pre-activations under the
  per-token weights, without forming them.

  x_q [C, I]: the inputs read with the per-token weights; x_k [C, I]: the inputs the gradients
  were taken at; w [I, O], b [1, O]: weights at the boundary; w_grad, b_grad: pending sums
  carried in from the state; g [C, O]: dl_s/dZ_s at the boundary weights; tau [C];
  e [C, C] = tril(τ_t eta_s).
  """
  attn = jnp.matmul(x_q, x_k.T, precision=_HIGHEST) + 1.0   # [C, C]: x_q,t·x_k,s + 1 (the bias)
  return (jnp.matmul(x_q, w, precision=_HIGHEST) + b
          - tau[:, None] * (jnp.matmul(x_q, w_grad, precision=_HIGHEST) + b_grad)
          - jnp.matmul(e * attn, g, precision=_HIGHEST))


def _linear_dual(params, grads, q, k, v, eta, tau, gamma, beta):
  """Dual form of one mini-batch of TTT-Linear (per head).

  q, k, v [C, K], eta [C], tau [C]. Returns (out [C, K], this mini-batch's grad sums).
  """
  w, b = params
  w_grad, b_grad = grads
  g = _ln_l2_grad(jnp.matmul(k, w, precision=_HIGHEST) + b, v - k, gamma, beta)   # [C, K]
  e = jnp.tril(tau[:, None] * eta[None, :])                                        # [C, C]
  z = _dual_layer(q, k, w, b, w_grad, b_grad, g, tau, e)
  out = q + _layer_norm(z, gamma, beta)[0]
  sums = (jnp.matmul(k.T * eta[None, :], g, precision=_HIGHEST),                  # [K, K]
          jnp.sum(eta[:, None] * g, axis=0, keepdims=True))                        # [1, K]
  return out, sums


def _mlp_dual(params, grads, q, k, v, eta, tau, gamma, beta):
  """Dual form of one mini-batch of TTT-MLP (per head); as `_linear_dual`."""
  w1, b1, w2, b2 = params
  w1_grad, b1_grad, w2_grad, b2_grad = grads
  z1 = jnp.matmul(k, w1, precision=_HIGHEST) + b1                                  # [C, M]
  x2 = _gelu(z1)
  g2 = _ln_l2_grad(jnp.matmul(x2, w2, precision=_HIGHEST) + b2, v - k, gamma, beta)  # [C, K]
  g1 = jnp.matmul(g2, w2.T, precision=_HIGHEST) * _gelu_grad(z1)                  # [C, M]
  e = jnp.tril(tau[:, None] * eta[None, :])
  z1_bar = _dual_layer(q, k, w1, b1, w1_grad, b1_grad, g1, tau, e)
  x2_bar = _gelu(z1_bar)
  z2_bar = _dual_layer(x2_bar, x2, w2, b2, w2_grad, b2_grad, g2, tau, e)
  out = q + _layer_norm(z2_bar, gamma, beta)[0]
  sums = (jnp.matmul(k.T * eta[None, :], g1, precision=_HIGHEST),
          jnp.sum(eta[:, None] * g1, axis=0, keepdims=True),
          jnp.matmul(x2.T * eta[None, :], g2, precision=_HIGHEST),
          jnp.sum(eta[:, None] * g2, axis=0, keepdims=True))
  return out, sums


_LINEAR = _Model(_linear_apply, _linear_dual)
_MLP = _Model(_mlp_apply, _mlp_dual)


def _run(op, model, q, k, v, eta, ln_weight, ln_bias, token_scale, state, mini_batch, impl):
  impl = resolve(op, impl, _AVAILABLE, _AUTO)
  f32 = lambda x: x.astype(jnp.float32)
  if token_scale is None:
    token_scale = 1.0 / jnp.arange(1, mini_batch + 1, dtype=jnp.float32)
  n = (len(state) - 1) // 2
  params = tuple(f32(x) for x in state[:n])
  grads = tuple(f32(x) for x in state[n:2 * n])
  count = state.count.astype(jnp.int32)
  args = (f32(q), f32(k), f32(v), f32(eta), f32(ln_weight), f32(ln_bias), f32(token_scale))
  if impl == "reference":
    out, params, grads, count = _reference(model, params, grads, count, *args, mini_batch)
  else:
    out, params, grads, count = _chunked(model, params, grads, count, *args, mini_batch)
  return out.astype(v.dtype), params, grads, count


def _reference(model, params, grads, count, q, k, v, eta, gamma, beta, tau, mb):
  """Token by token: each token's inner gradient by `jax.grad`, the oracle."""

  def loss(p, k_t, v_t, gamma_h, beta_h):
    y = _layer_norm(model.apply(p, k_t), gamma_h, beta_h)[0]
    return 0.5 * jnp.sum(jnp.square(y - (v_t - k_t)))

  def head_step(p, gr, c, q_t, k_t, v_t, eta_t, gamma_h, beta_h):
    """One token of one (batch, head): p, gr per-head params; q_t, k_t, v_t [K]; c, eta_t []."""
    g = jax.grad(loss)(p, k_t, v_t, gamma_h, beta_h)
    gr = tuple(a + eta_t * da for a, da in zip(gr, g))
    eff = tuple(a - tau[c] * da for a, da in zip(p, gr))
    out = q_t + _layer_norm(model.apply(eff, q_t), gamma_h, beta_h)[0]
    c = c + 1
    done = c == mb
    p = tuple(jnp.where(done, a, b) for a, b in zip(eff, p))
    gr = tuple(jnp.where(done, 0.0, a) for a in gr)
    return p, gr, jnp.where(done, 0, c), out

  # vmap over heads (params, gamma/beta per head; count shared), then over batch.
  per_head = jax.vmap(head_step, in_axes=(0, 0, None, 0, 0, 0, 0, 0, 0),
                      out_axes=(0, 0, None, 0))
  per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0, 0, None, None))

  def step(carry, xs):
    p, gr, c = carry
    p, gr, c, out = per_batch(p, gr, c, *xs, gamma, beta)
    return (p, gr, c), out

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, eta))        # [t, b, h, ...]
  (params, grads, count), out = jax.lax.scan(step, (params, grads, count), xs)
  return jnp.moveaxis(out, 0, 1), params, grads, count             # [b, t, h, k]


def _chunked(model, params, grads, count, q, k, v, eta, gamma, beta, tau, mb):
  """Mini-batch dual form with a `lax.scan` over mini-batches (see the module docstring)."""
  bsz, t, h, dk = q.shape
  # Room for the pending tokens in front (count < mb) and padding up to whole mini-batches.
  n = -(-(t + mb - 1) // mb)
  length = n * mb

  def place(x, c):  # x [T, H, ...] -> [length, H, ...], x shifted right by c, zeros elsewhere
    buf = jnp.zeros((length,) + x.shape[1:], x.dtype)
    return jax.lax.dynamic_update_slice(buf, x, (c,) + (0,) * (x.ndim - 1))

  placed = [jax.vmap(place)(x, count) for x in (q, k, v, eta)]     # eta = 0 on padding
  # [b, n*c, h, d] -> [n, b, h, c, d]: the scan runs over mini-batches.
  chunks = [jnp.moveaxis(x.reshape((bsz, n, mb) + x.shape[2:]), (1, 3), (0, 2)) for x in placed]

  dual = jax.vmap(jax.vmap(model.dual, in_axes=(0, 0, 0, 0, 0, 0, None, 0, 0)),
                  in_axes=(0, 0, 0, 0, 0, 0, None, None, None))
  ends = (jnp.arange(n) + 1) * mb                                   # [n] end of mini-batch j

  def step(carry, xs):
    p, gr = carry
    qj, kj, vj, etaj, end_j = xs
    out, sums = dual(p, gr, qj, kj, vj, etaj, tau, gamma, beta)
    gr = tuple(a + s for a, s in zip(gr, sums))
    done = (end_j <= count + t)[:, None, None, None]                # [b, 1, 1, 1]
    p = tuple(jnp.where(done, a - tau[-1] * da, a) for a, da in zip(p, gr))
    gr = tuple(jnp.where(done, 0.0, a) for a in gr)
    return (p, gr), out

  (params, grads), out = jax.lax.scan(step, (params, grads), (*chunks, ends))
  out = jnp.moveaxis(out, (0, 2), (1, 3)).reshape(bsz, length, h, dk)  # [b, n*c, h, k]
  out = jax.vmap(lambda o, c: jax.lax.dynamic_slice_in_dim(o, c, t, axis=0))(out, count)
  return out, params, grads, (count + t) % mb
