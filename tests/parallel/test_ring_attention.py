"""Context-parallel attention (ring and all-gather) against `attention(impl="reference")`.

Runs on the simulated CPU devices of tests/conftest.py with meshes of 2 and 4 along `sequence`.
Every case checks outputs, lse and the gradients of q, k, v (through one random cotangent).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import Mesh

from seqmix.ops.attention import attention
from seqmix.ops.attention import blockwise_attention
from seqmix.parallel import ring_attention as ra
from seqmix.testing import assert_rel_close

RTOL = 1e-5
SLOW = pytest.mark.slow
# The default suite runs the 4-device mesh of each case (it has interior shards, edges on both
# sides); the 2-device twins are in `make test-full`.
N = [pytest.param(2, marks=SLOW), 4]


def _mesh(n, axis_type=AxisType.Auto):
  return Mesh(np.array(jax.devices()[:n]), ("sequence",), axis_types=(axis_type,))


def _inputs(t=16, h=4, g=2, d=8, b=2, seed=0, segments=False):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32)
  k = jax.random.normal(ks[1], (b, t, g, d), jnp.float32)
  v = jax.random.normal(ks[2], (b, t, g, d), jnp.float32)
  do = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)
  ids = None
  if segments:
    # Boundaries inside shards and exactly on the shard / zigzag-chunk edges (4, 8, 12).
    ids = jnp.array([[0] * 3 + [1] * 5 + [2] * 1 + [3] * 7,
                     [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4], jnp.int32)[:b, :t]
  return q, k, v, do, ids


def _value_and_grads(fn, q, k, v, do):
  def loss(q, k, v):
    o, lse = fn(q, k, v)
    return jnp.sum(o * do), (o, lse)
  grads, (o, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return o, lse, grads


def _check(mode, n, *, causal=True, window=None, segments=False, load_balance=True, g=2,
           axis_type=AxisType.Auto, impl="reference", backward="autodiff"):
  q, k, v, do, ids = _inputs(g=g, segments=segments)
  mesh = _mesh(n, axis_type)

  def par(q, k, v):
    return ra.context_parallel_attention(q, k, v, mesh=mesh, context_parallel=mode,
                                         causal=causal, window=window, segment_ids=ids,
                                         load_balance=load_balance, impl=impl,
                                         backward=backward)

  def ref(q, k, v):
    o, _ = attention(q, k, v, causal=causal, window=window, segment_ids=ids, impl="reference")
    _, lse = blockwise_attention(q, k, v, causal=causal, window=window, segment_ids=ids,
                                 impl="reference")
    return o, lse

  with jax.set_mesh(mesh):
    o, lse, grads = jax.jit(lambda *a: _value_and_grads(par, *a))(q, k, v, do)
  o_r, lse_r, grads_r = jax.jit(lambda *a: _value_and_grads(ref, *a))(q, k, v, do)
  assert_rel_close(o, o_r, RTOL, "o")
  finite = jnp.isfinite(lse_r)
  np.testing.assert_array_equal(jnp.isfinite(lse), finite)
  assert_rel_close(jnp.where(finite, lse, 0), jnp.where(finite, lse_r, 0), RTOL, "lse")
  for name, a, b in zip("qkv", grads, grads_r):
    assert_rel_close(a, b, RTOL, f"d{name}")


@pytest.mark.parametrize("n", N)
@pytest.mark.parametrize("mode", ["ring", "allgather"])
def test_causal_load_balanced_gqa_segments(mode, n):
  _check(mode, n, segments=True, impl="chunked")


def test_ring_custom_vjp():
  # The re-rotating backward: zigzag over the whole ring, and a window that stops the ring
  # early (its K/V gradients are sent home from 2 devices away).
  _check("ring", 4, segments=True, backward="ring", impl="chunked")
  _check("ring", 4, window=6, g=1, backward="ring")


@pytest.mark.parametrize("n", N)
def test_ring_causal_contiguous(n):
  _check("ring", n, load_balance=False, g=4)


@pytest.mark.parametrize("n", N)
def test_ring_window(n):
  # T/n = 8 or 4 tokens per shard; W = 6 reaches one block back on n=2 and two on n=4.
  _check("ring", n, window=6, g=1)   # no segments: their edges would hide the reach-back


@SLOW
def test_ring_window_spanning_all_shards():
  _check("ring", 4, window=13, g=2)


def test_ring_and_allgather_bidirectional():
  _check("ring", 4, causal=False)
  _check("allgather", 2, causal=False, segments=True)


def test_allgather_window():
  _check("allgather", 4, window=6)


def test_explicit_mesh_axes():
  _check("ring", 2, segments=True, axis_type=AxisType.Explicit)


def _ring_rotations(n, window, t=16):
  """Rotations of K/V the ring runs: the length of its scan over ring steps."""
  q, k, v, _, _ = _inputs(t=t)
  mesh = _mesh(n)
  fn = lambda q, k, v: ra.ring_attention(q, k, v, mesh=mesh, window=window, load_balance=False,
                                         impl="reference")
  jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
  lengths = re.findall(r"length=(\d+)", jaxpr)
  assert len(lengths) == 1, jaxpr     # the reference blocks have no scan of their own
  return int(lengths[0])


def test_ring_window_visits_only_needed_neighbours():
  # n=4, T/n=4: W=9 reaches two blocks back (2 rotations), W=5 one, W=1 only the query
  # itself (no rotation); no window: the whole ring (3).
  assert _ring_rotations(4, None) == 3
  assert _ring_rotations(4, 9) == 2
  assert _ring_rotations(4, 5) == 1
  assert _ring_rotations(4, 1) == 0


def test_zigzag_order_roundtrip():
  x = jnp.arange(2 * 16).reshape(2, 16)
  z = ra.zigzag_order(x, 4)
  np.testing.assert_array_equal(z[0, :4], [0, 1, 14, 15])     # device 0: chunks 0 and 7
  np.testing.assert_array_equal(z[0, 12:], [6, 7, 8, 9])      # device 3: chunks 3 and 4
  np.testing.assert_array_equal(ra.zigzag_restore(z, 4), x)


def test_bad_arguments():
  q, k, v, _, _ = _inputs(t=12)
  with pytest.raises(ValueError, match="divisible by 2n=8"):
    ra.ring_attention(q, k, v, mesh=_mesh(4))
  with pytest.raises(ValueError, match="context_parallel="):
    ra.context_parallel_attention(q, k, v, mesh=_mesh(2), context_parallel="ulysses")
  with pytest.raises(ValueError, match="not 'seq'"):
    ra.ring_attention(q, k, v, mesh=_mesh(2), axis_name="seq")
