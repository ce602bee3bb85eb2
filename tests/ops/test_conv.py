"""seqmix.ops.conv.causal_conv: the direct sum vs the contract, fft vs the direct sum."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops import conv
from seqmix.ops.conv import causal_conv
from seqmix.testing import assert_rel_close, assert_trees_rel_close

_op = jax.jit(causal_conv, static_argnames=("impl",))


def _inputs(seed, *, b=2, t=64, d=8, taps=4, init=True, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  u = rng.standard_normal((b, t, d), np.float32)
  k = rng.standard_normal((taps, d), np.float32) / np.sqrt(taps)
  s0 = rng.standard_normal((b, taps - 1, d), np.float32) if init else None
  cast = lambda x: None if x is None else jnp.asarray(x, dtype)
  return cast(u), cast(k), cast(s0)


def _naive(u, k, s0):
  """The documented sum in float64 numpy: y_t = sum_s k_s u_{t-s}, u_{<0} from s0."""
  u, k = np.asarray(u, np.float64), np.asarray(k, np.float64)
  b, t, d = u.shape
  taps = k.shape[0]
  past = np.zeros((b, taps - 1, d)) if s0 is None else np.asarray(s0, np.float64)
  y = np.zeros((b, t, d))
  for ti in range(t):
    for s in range(taps):
      src = u[:, ti - s] if ti - s >= 0 else past[:, taps - 1 + ti - s]  # oldest first
      y[:, ti] += k[s] * src
  state = np.concatenate([past, u], axis=1)[:, t:]                     # last L-1 rows
  return y, state


def _cotangents(y_shape, state_shape, seed=7):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(y_shape).astype(np.float32),
          rng.standard_normal(state_shape).astype(np.float32))


def _naive_grads(u, k, s0, ct_y, ct_state):
  """The adjoint of `_naive` in float64 numpy: d<y, ct_y> + <state, ct_state> / d(u, k, s0).

  With x = concat(s0, u) ([b, L-1+T, d]), y_t = sum_s k_s x_{L-1+t-s} and state = x[T:].
  """
  u, k = np.asarray(u, np.float64), np.asarray(k, np.float64)
  ct_y, ct_state = np.asarray(ct_y, np.float64), np.asarray(ct_state, np.float64)
  b, t, d = u.shape
  l1 = k.shape[0] - 1
  past = np.zeros((b, l1, d)) if s0 is None else np.asarray(s0, np.float64)
  x = np.concatenate([past, u], axis=1)
  gx, gk = np.zeros_like(x), np.zeros_like(k)
  for s in range(l1 + 1):
    gx[:, l1 - s:l1 - s + t] += k[s] * ct_y
    gk[s] = np.sum(ct_y * x[:, l1 - s:l1 - s + t], axis=(0, 1))
  gx[:, t:] += ct_state
  return gx[:, l1:], gk, (None if s0 is None else gx[:, :l1])


@pytest.mark.parametrize("impl", ["reference", "fft"])
@pytest.mark.parametrize("taps,t,init", [(1, 7, True), (4, 10, True), (4, 2, True),
                                         (6, 10, False), (40, 50, True)])
def test_matches_contract(impl, taps, t, init):
  """Both impls against an explicit loop; T < L-1 and the unrolled/scanned sums included."""
  u, k, s0 = _inputs(0, t=t, taps=taps, init=init)
  y, state = _op(u, k, initial_state=s0, impl=impl)
  y_np, state_np = _naive(u, k, s0)
  assert_rel_close(y, y_np, 1e-5, "output")
  assert state.shape == (2, taps - 1, 8) and state.dtype == u.dtype
  np.testing.assert_array_equal(np.asarray(state), state_np.astype(np.float32))


def _value_and_grads(u, k, s0, impl, seed=7):
  """(y, state) and the gradients of <y, ct_y> + <state, ct_state> (`_cotangents(seed)`)."""
  taps = k.shape[0]
  ct_y, ct_state = _cotangents(u.shape, (u.shape[0], taps - 1, u.shape[2]), seed)

  def loss(args):
    u, k, s0 = args
    y, state = causal_conv(u, k, initial_state=s0, impl=impl)
    return (jnp.sum(y.astype(jnp.float32) * ct_y)
            + jnp.sum(state.astype(jnp.float32) * ct_state), (y, state))

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))((u, k, s0))
  return out, grads


def _check_against_naive(u, k, s0, out, grads, rtol, name, seed=7):
  """Output (rtol), state (exactly: a copy of inputs) and all gradients (rtol) vs numpy."""
  y, state = out
  y_np, state_np = _naive(u, k, s0)
  ct_y, ct_state = _cotangents(y_np.shape, state_np.shape, seed)
  assert_rel_close(y, y_np, rtol, f"{name} output")
  assert state.dtype == u.dtype
  np.testing.assert_array_equal(np.asarray(state, np.float64), state_np,
                                err_msg=f"{name} state")
  assert_trees_rel_close(grads, _naive_grads(u, k, s0, ct_y, ct_state), rtol, f"{name} grad")


@pytest.mark.parametrize("taps,t,init", [(1, 100, True), (4, 63, True), (64, 100, False),
                                         (64, 100, True), (256, 256, True)])
def test_fft_matches_reference(taps, t, init):
  """Outputs, state and the gradients of u, k and the initial state; L = T included.

  Both impls share the state (sliced before the dispatch), so each impl's state and gradients
  are checked against the float64 numpy sum and its adjoint, not against each other only.
  """
  u, k, s0 = _inputs(1, t=t, taps=taps, init=init)
  out_ref, g_ref = _value_and_grads(u, k, s0, "reference")
  out, grads = _value_and_grads(u, k, s0, "fft")
  _check_against_naive(u, k, s0, out_ref, g_ref, 1e-5, "reference")
  _check_against_naive(u, k, s0, out, grads, 1e-5, "fft")
  assert_rel_close(out[0], out_ref[0], 1e-5, "fft vs reference output")
  assert_trees_rel_close(grads, g_ref, 1e-5, "fft vs reference grad")


@pytest.mark.slow
def test_fft_long_kernel_matches_reference():
  """The SSM-mixer size: L = T = 1024 (a few seconds: kept out of the default run)."""
  u, k, s0 = _inputs(2, b=1, t=1024, d=4, taps=1024)
  (y_ref, _), g_ref = _value_and_grads(u, k, s0, "reference")
  (y, _), grads = _value_and_grads(u, k, s0, "fft")
  assert_rel_close(y, y_ref, 1e-5, "output")
  assert_trees_rel_close(grads, g_ref, 1e-5, "grad")


@pytest.mark.parametrize("impl", ["reference", "fft"])
def test_bfloat16(impl):
  """bf16 in, bf16 out and state; the oracle is the float32 sum of the same bf16 values."""
  u, k, s0 = _inputs(3, t=100, taps=64, dtype=jnp.bfloat16)
  (y, st), grads = _value_and_grads(u, k, s0, impl)
  f32 = lambda x: x.astype(jnp.float32)
  (y_ref, _), g_ref = _value_and_grads(f32(u), f32(k), f32(s0), "reference")
  assert y.dtype == st.dtype == jnp.bfloat16
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  assert_rel_close(y, y_ref, 1e-2, "output")
  assert_trees_rel_close(grads, g_ref, 1e-2, "grad")
  # The state is a copy of the (bf16) inputs: exact against the numpy slice of the same values.
  np.testing.assert_array_equal(np.asarray(st, np.float64), _naive(u, k, s0)[1])


@pytest.mark.parametrize("impl", ["reference", "fft"])
@pytest.mark.parametrize("taps", [1, 4, 64])
def test_chained_steps_equal_whole(impl, taps):
  """Prefill of 3 tokens (fewer than L-1 for L=64), then one-token steps, equals the whole."""
  u, k, s0 = _inputs(4, t=12, taps=taps)
  y, state = _op(u, k, initial_state=s0, impl=impl)
  ys, st = [], s0
  y0, st = _op(u[:, :3], k, initial_state=st, impl=impl)
  ys.append(y0)
  for i in range(3, 12):
    yi, st = _op(u[:, i:i + 1], k, initial_state=st, impl=impl)
    ys.append(yi)
  assert_rel_close(jnp.concatenate(ys, axis=1), y, 1e-6, "stepped output")
  np.testing.assert_array_equal(np.asarray(st), np.asarray(state))


@pytest.mark.parametrize("impl", ["reference", "fft"])
def test_split_equals_whole(impl):
  u, k, s0 = _inputs(5, t=100, taps=64)
  y, state = _op(u, k, initial_state=s0, impl=impl)
  y1, st = _op(u[:, :70], k, initial_state=s0, impl=impl)
  y2, st = _op(u[:, 70:], k, initial_state=st, impl=impl)
  assert_rel_close(jnp.concatenate([y1, y2], axis=1), y, 1e-6, "split output")
  np.testing.assert_array_equal(np.asarray(st), np.asarray(state))


def test_auto_threshold():
  assert not conv._use_fft(1, 1024)         # a decoding step stays direct
  assert not conv._use_fft(4096, 4)         # a short conv stays direct
  assert conv._use_fft(1024, 1024)          # a long conv over a long sequence uses the FFT
  for taps in (4, 64):
    u, k, s0 = _inputs(6, t=100, taps=taps)
    y, _ = _op(u, k, initial_state=s0)
    y_ref, _ = _op(u, k, initial_state=s0, impl="reference")
    assert_rel_close(y, y_ref, 1e-5, f"auto output L={taps}")


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_fft_jit_matches_reference(self):
    u, k, s0 = _inputs(7, t=40, taps=8)
    y, st = self.variant(lambda u, k, s0: causal_conv(u, k, initial_state=s0, impl="fft"))(
        u, k, s0)
    y_ref, _ = _op(u, k, initial_state=s0, impl="reference")
    assert_rel_close(y, y_ref, 1e-5, "output")
    np.testing.assert_array_equal(np.asarray(st, np.float64), _naive(u, k, s0)[1])


def test_errors_name_the_value():
  u, k, s0 = _inputs(8, t=5, taps=4)
  with pytest.raises(ValueError, match="share a dtype"):
    causal_conv(u, k.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match=r"k must be \[L, D\]"):
    causal_conv(u, k[:, :3])
  with pytest.raises(ValueError, match="initial_state"):
    causal_conv(u, k, initial_state=s0[:, :2])
  with pytest.raises(ValueError, match="unknown impl"):
    causal_conv(u, k, impl="pallas")
