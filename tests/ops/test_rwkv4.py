"""rwkv4.wkv: stabilised forms against the plain float64 sum; `chunked` against `reference`."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.ops.rwkv4 import WKVState, wkv
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

BATCH, DIM = 2, 6  # DIM: default channels; the chunked-vs-reference grid also runs 16, 60, 64


def _inputs(seed, t, k_scale=1.0, dtype=jnp.float32, dim=DIM, strong=False):
  """strong: per-step decays e^{w} down to ~e^{-400} (time_decay ~ N(4, 1))."""
  rng = np.random.default_rng(seed)
  time_decay = rng.normal(size=(dim,)) + (4.0 if strong else -1.0)
  w = -np.exp(time_decay)
  u = rng.normal(size=(dim,))
  k = rng.normal(size=(BATCH, t, dim)) * k_scale
  v = rng.normal(size=(BATCH, t, dim))
  return (jnp.asarray(w, jnp.float32), jnp.asarray(u, jnp.float32), jnp.asarray(k, dtype),
          jnp.asarray(v, dtype))


def _direct(w, u, k, v, stable):
  """out_t from its definition in float64; `stable` subtracts each row's max exponent first."""
  w, u, k, v = (np.asarray(x, np.float64) for x in (w, u, k, v))
  t = k.shape[1]
  out = np.zeros_like(v)
  for s in range(t):
    expo = np.concatenate([(s - 1 - np.arange(s))[None, :, None] * w + k[:, :s],
                           (u + k[:, s])[:, None]], axis=1)  # [b, i, d]
    if stable:
      expo = expo - expo.max(axis=1, keepdims=True)
    e = np.exp(expo)
    out[:, s] = (e * v[:, :s + 1]).sum(1) / e.sum(1)
  return out


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_matches_unstabilised_float64_sum(impl):
  w, u, k, v = _inputs(0, 37)
  out, _ = wkv(w, u, k, v, chunk_size=16, impl=impl)
  assert_rel_close(out, _direct(w, u, k, v, stable=False), RTOL["float32"], "out")


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_large_keys_do_not_overflow(impl):
  # e^{k} overflows float32 beyond k ~ 88 (and float64 beyond ~709): keys up to ~2000.
  w, u, k, v = _inputs(1, 40, k_scale=500.0)
  out, state = wkv(w, u, k, v, chunk_size=16, impl=impl)
  assert all(np.all(np.isfinite(np.asarray(s))) for s in state)
  assert_rel_close(out, _direct(w, u, k, v, stable=True), RTOL["float32"], "out")
  grads = jax.grad(lambda *a: wkv(*a, chunk_size=16, impl=impl)[0].sum(), argnums=(0, 1, 2, 3))(
      w, u, k, v)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def _value_and_grads(impl, w, u, k, v, state, chunk_size, seed):
  def f(w, u, k, v, state):
    out, s = wkv(w, u, k, v, initial_state=state, chunk_size=chunk_size, impl=impl)
    return out.astype(jnp.float32), s

  out, vjp = jax.vjp(f, w, u, k, v, state)
  rng = np.random.default_rng(seed)
  cot = jax.tree.map(lambda o: jnp.asarray(rng.normal(size=o.shape), o.dtype), out)
  return out, jax.tree.map(lambda g: g.astype(jnp.float32), vjp(cot))


def _some_state(seed, dim=DIM, t=9):
  w, u, k, v = _inputs(seed, t, dim=dim)
  return wkv(w, u, k, v, impl="reference")[1]


SAMPLED = [
    # T, chunk_size, dtype, with_init, dim, strong
    (1, 16, jnp.float32, False, 16, False),
    (63, 16, jnp.float32, False, 60, False),
    (100, 16, jnp.bfloat16, True, DIM, True),
    (256, 64, jnp.float32, True, 64, True),
]


@pytest.mark.parametrize("t,chunk_size,dtype,with_init,dim,strong", SAMPLED)
def test_chunked_matches_reference(t, chunk_size, dtype, with_init, dim, strong):
  _check(t, chunk_size, dtype, with_init, dim, strong)


@pytest.mark.slow
@pytest.mark.parametrize("t,chunk_size,dtype,with_init,dim,strong", list(itertools.product(
    (1, 63, 100, 256), (16, 64), (jnp.float32, jnp.bfloat16), (False, True), (16, 60, 64),
    (False, True))))
def test_chunked_matches_reference_full(t, chunk_size, dtype, with_init, dim, strong):
  _check(t, chunk_size, dtype, with_init, dim, strong)


def _check(t, chunk_size, dtype, with_init, dim, strong):
  w, u, k, v = _inputs(2, t, k_scale=3.0, dtype=dtype, dim=dim, strong=strong)
  state = _some_state(3, dim) if with_init else None
  if state is None:  # differentiate through the empty state as well
    state = WKVState(*(jnp.asarray(s) for s in wkv(w, u, k[:, :0], v[:, :0])[1]))
  out, grads = _value_and_grads("chunked", w, u, k, v, state, chunk_size, 4)
  ref_out, ref_grads = _value_and_grads("reference", w, u, k, v, state, chunk_size, 4)
  rtol = RTOL[jnp.dtype(dtype).name]
  # Same float32 maths on the same inputs in another order: float32 tolerance except where a
  # result is cast to bf16 (out, dk, dv for bf16 inputs).
  assert_rel_close(out[0], ref_out[0], rtol, "out")
  assert_trees_rel_close(out[1], ref_out[1], RTOL["float32"], "state")
  names = ("dw", "du", "dk", "dv")
  for name, g, rg in zip(names, grads[:4], ref_grads[:4]):
    assert_rel_close(g, rg, rtol if name in ("dk", "dv") else RTOL["float32"], name)
  # The empty state's p = -1e38 gets no gradient; its a, b do.
  assert_trees_rel_close(grads[4], ref_grads[4], RTOL["float32"], "dstate")


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_infinite_decay_keeps_one_previous_token(impl):
  # w = -inf: e^{(t-1-i) w} is 1 for i = t-1 and 0 further back (no NaN from 0 * -inf).
  w, u, k, v = _inputs(7, 37)
  w = w.at[::2].set(-jnp.inf)
  out, state = wkv(w, u, k, v, chunk_size=16, impl=impl)
  kk, vv = np.asarray(k, np.float64), np.asarray(v, np.float64)
  e_prev = np.exp(kk[:, :-1])
  e_now = np.exp(np.asarray(u, np.float64) + kk[:, 1:])
  want = (e_prev * vv[:, :-1] + e_now * vv[:, 1:]) / (e_prev + e_now)
  assert_rel_close(np.asarray(out)[:, 1:, ::2], want[..., ::2], RTOL["float32"], "out")
  grads = jax.grad(lambda *a: jnp.sum(wkv(*a, chunk_size=16, impl=impl)[0] ** 2) +
                   jnp.sum(wkv(*a, chunk_size=16, impl=impl)[1].a), argnums=(0, 1, 2, 3))(
                       w, u, k, v)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_split_equals_whole(impl):
  w, u, k, v = _inputs(5, 50, k_scale=3.0)
  out, state = wkv(w, u, k, v, chunk_size=16, impl=impl)
  out1, s1 = wkv(w, u, k[:, :23], v[:, :23], chunk_size=16, impl=impl)
  out2, s2 = wkv(w, u, k[:, 23:], v[:, 23:], initial_state=s1, chunk_size=16, impl=impl)
  assert_trees_rel_close((jnp.concatenate([out1, out2], 1), s2), (out, state), RTOL["float32"])


def test_jit_and_errors():
  w, u, k, v = _inputs(6, 20)
  out, state = jax.jit(lambda *a: wkv(*a))(w, u, k, v)
  assert out.dtype == jnp.float32 and isinstance(state, WKVState)
  with pytest.raises(NotImplementedError, match="reference"):
    wkv(w, u, k, v, impl="pallas")
  with pytest.raises(ValueError, match="w and u"):
    wkv(w[:3], u, k, v)
