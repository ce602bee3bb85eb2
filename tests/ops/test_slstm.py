"""slstm: the stabilised scan against the unstabilised paper maths in float64, state handling."""

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops.slstm import SLSTMState, empty_state, slstm
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

BATCH, HEADS, HEAD_DIM = 2, 3, 5


def _inputs(seed, t, scale=1.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, t, 4, HEADS, HEAD_DIM)) * scale
  R = rng.normal(size=(4, HEADS, HEAD_DIM, HEAD_DIM)) / np.sqrt(HEAD_DIM)
  bias = rng.normal(size=(4, HEADS, HEAD_DIM)) * 0.5
  return jnp.asarray(x, dtype), jnp.asarray(R, jnp.float32), jnp.asarray(bias, jnp.float32)


def _random_state(seed):
  rng = np.random.default_rng(seed)
  shape = (BATCH, HEADS, HEAD_DIM)
  n = rng.uniform(0.5, 2.0, shape)
  c = rng.uniform(-1.0, 1.0, shape) * n  # |c| <= n, as any reachable state has
  return SLSTMState(*(jnp.asarray(v, jnp.float32)
                      for v in (c, n, rng.normal(size=shape), rng.uniform(-1, 1, shape))))


def _unstabilised(x, R, bias, state, forget_gate):
  """Paper eqs. 8-17 in float64 without a stabiliser: C = c e^m, N = n e^m."""
  x, R, bias = (np.asarray(v, np.float64) for v in (x, R, bias))
  c, n, m, h = (np.asarray(v, np.float64) for v in state)
  big_c, big_n = c * np.exp(m), n * np.exp(m)
  sig = lambda v: 1 / (1 + np.exp(-v))
  hs = []
  for t in range(x.shape[1]):
    raw = x[:, t] + np.einsum("bhd,ghde->bghe", h, R) + bias
    z, i, f, o = np.tanh(raw[:, 0]), np.exp(raw[:, 1]), raw[:, 2], sig(raw[:, 3])
    f = sig(f) if forget_gate == "sigmoid" else np.exp(f)
    big_c = f * big_c + i * z
    big_n = f * big_n + i
    h = o * big_c / big_n
    hs.append(h)
  return np.stack(hs, 1), big_c, big_n


@pytest.mark.parametrize("forget_gate,with_init", [("sigmoid", False), ("exp", True)])
def test_matches_unstabilised_float64(forget_gate, with_init):
  x, R, bias = _inputs(0, 30)
  state = _random_state(1) if with_init else empty_state(BATCH, HEADS, HEAD_DIM)
  h, final = slstm(x, R, bias, initial_state=state if with_init else None,
                   forget_gate=forget_gate)
  want_h, want_c, want_n = _unstabilised(x, R, bias, state, forget_gate)
  assert_rel_close(h, want_h, RTOL["float32"], "h")
  scale = np.exp(np.asarray(final.m, np.float64))
  assert_rel_close(np.asarray(final.c) * scale, want_c, RTOL["float32"], "c e^m")
  assert_rel_close(np.asarray(final.n) * scale, want_n, RTOL["float32"], "n e^m")
  assert_rel_close(final.h, want_h[:, -1], RTOL["float32"], "state h")


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_split_equals_whole(forget_gate):
  x, R, bias = _inputs(2, 41)
  h, state = slstm(x, R, bias, forget_gate=forget_gate)
  h1, s1 = slstm(x[:, :17], R, bias, forget_gate=forget_gate)
  h2, s2 = slstm(x[:, 17:], R, bias, initial_state=s1, forget_gate=forget_gate)
  assert_trees_rel_close((jnp.concatenate([h1, h2], 1), s2), (h, state), RTOL["float32"])


def test_nonzero_initial_state_and_one_token_steps():
  """A non-empty initial state (a plain tuple, sigmoid gate: the float64 test above runs the
  non-empty state with the exp gate) is the paper's memory C = c e^m, N = n e^m; and stepping
  one token at a time through the returned states, starting from it, equals the whole call."""
  x, R, bias = _inputs(3, 12)
  state = _random_state(9)
  h, final = slstm(x, R, bias, initial_state=tuple(state))
  want_h, want_c, want_n = _unstabilised(x, R, bias, state, "sigmoid")
  assert_rel_close(h, want_h, RTOL["float32"], "h")
  scale = np.exp(np.asarray(final.m, np.float64))
  assert_rel_close(np.asarray(final.c) * scale, want_c, RTOL["float32"], "c e^m")
  assert_rel_close(np.asarray(final.n) * scale, want_n, RTOL["float32"], "n e^m")
  s = state
  steps = []
  for t in range(x.shape[1]):
    out, s = slstm(x[:, t:t + 1], R, bias, initial_state=s)
    steps.append(out)
  assert_trees_rel_close((jnp.concatenate(steps, 1), s), (h, final), RTOL["float32"])


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_large_preactivations_stay_finite(forget_gate):
  # Pre-activations ~ N(0, 50^2): e^{raw_i} overflows float32 without the stabiliser.
  x, R, bias = _inputs(4, 40, scale=50.0)
  state = _random_state(5)

  def loss(x, R, bias, state):
    h, s = slstm(x, R, bias, initial_state=state, forget_gate=forget_gate)
    return jnp.sum(h * h) + sum(jnp.sum(v) for v in s)

  h, s = slstm(x, R, bias, initial_state=state, forget_gate=forget_gate)
  assert np.all(np.isfinite(np.asarray(h))) and np.all(np.abs(np.asarray(h)) <= 1.0)
  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(x, R, bias, state)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g)))


def test_gradients_match_finite_differences():
  x, R, bias = _inputs(6, 8)
  state = _random_state(7)
  f = lambda x, R, bias, state: jnp.sum(jnp.sin(slstm(x, R, bias, initial_state=state)[0]))
  # Central differences in float32 with step 1e-2: truncation ~eps^2 |f'| ~ 1e-4 and
  # rounding ~ 2^-24 |f| / eps ~ 1e-5 relative, so 1e-2 checks the VJP, not float32 rounding.
  jtu.check_grads(f, (x, R, bias, state), order=1, modes=["rev"], atol=1e-2,
                  rtol=1e-2, eps=1e-2)


def test_dtypes_jit_and_errors():
  x, R, bias = _inputs(8, 6, dtype=jnp.bfloat16)
  h, s = jax.jit(lambda *a: slstm(*a))(x, R, bias)
  assert h.dtype == jnp.bfloat16 and h.shape == (BATCH, 6, HEADS, HEAD_DIM)
  assert all(v.dtype == jnp.float32 for v in s)
  with pytest.raises(NotImplementedError, match="reference"):
    slstm(x, R, bias, impl="pallas")
  with pytest.raises(ValueError, match="chunked"):
    slstm(x, R, bias, impl="chunked")
  with pytest.raises(ValueError, match="R must be"):
    slstm(x, R[:, :1], bias)
