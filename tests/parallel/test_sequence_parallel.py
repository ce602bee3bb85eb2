"""Sequence-parallel recurrent ops against their single-device reference forms.

Meshes of 2 and 4 devices along `sequence` (T = 16: shard edges at 8, or 4, 8, 12). Every case
compares outputs, final states and the gradients of every float input (initial state included)
through random cotangents; resets (gate −inf, a = 0) sit inside a shard and exactly on the shard
edge t = 8 (shared by both meshes), and for the 4-way mesh also on t = 4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import Mesh

from seqmix.ops import conv
from seqmix.ops import delta_rule as delta_ops
from seqmix.ops import linear_attention as la
from seqmix.ops import mlstm as mlstm_ops
from seqmix.ops import scan
from seqmix.ops import ssm
from seqmix.parallel import sequence_parallel as sp
from seqmix.testing import assert_trees_rel_close

B, T, H, K, V = 2, 16, 2, 6, 5
RESETS = (4, 8, 11)   # 4 and 8 are shard edges (8 on both meshes), 11 is inside a shard
RTOL = 1e-5
SLOW = pytest.mark.slow
# The default suite runs the 4-device mesh of each op; the 2-device twins and the other gate
# forms of gla are in `make test-full`.
N = [pytest.param(2, marks=SLOW), 4]


def _mesh(n, axis_type=AxisType.Auto):
  return Mesh(np.array(jax.devices()[:n]), ("sequence",), axis_types=(axis_type,))


def _keys(seed, n):
  return jax.random.split(jax.random.key(seed), n)


def _with_resets(log_gate):
  """−inf at the RESETS time steps of a [B, T, ...] log gate."""
  t = jnp.arange(T).reshape((1, T) + (1,) * (log_gate.ndim - 2))
  return jnp.where(jnp.isin(t, jnp.array(RESETS)), -jnp.inf, log_gate)


def _compare(par, ref, args, diff, mesh, rtol=RTOL):
  """par(*args) vs ref(*args): outputs, final state, and grads of args[j] for j in diff."""
  ks = _keys(99, 2)
  out_r = jax.jit(ref)(*args)
  cot = [jax.random.normal(kk, x.shape, jnp.float32) for kk, x in zip(ks, out_r)]

  def loss(fn):
    def f(*dargs):
      full = list(args)
      for j, x in zip(diff, dargs):
        full[j] = x
      o, s = fn(*full)
      return jnp.sum(o * cot[0]) + jnp.sum(s * cot[1]), (o, s)
    return jax.jit(jax.grad(f, argnums=tuple(range(len(diff))), has_aux=True))

  dargs = [args[j] for j in diff]
  with jax.set_mesh(mesh):
    grads, out = loss(par)(*dargs)
  grads_r, out_r = loss(ref)(*dargs)
  assert_trees_rel_close(out, out_r, rtol, "outputs")
  assert_trees_rel_close(grads, grads_r, rtol, "grads")


@pytest.mark.parametrize("n", N)
def test_linear_scan(n):
  k1, k2, k3 = _keys(0, 3)
  a = jax.random.uniform(k1, (B, T, V), minval=-1.0, maxval=1.0)   # negative a included
  a = jnp.where(jnp.isin(jnp.arange(T), jnp.array(RESETS))[None, :, None], 0.0, a)
  x = jax.random.normal(k2, (B, T, V))
  h0 = jax.random.normal(k3, (B, V))
  mesh = _mesh(n)
  par = lambda a, x, h0: sp.linear_scan(a, x, mesh=mesh, initial_state=h0, chunk_size=4,
                                    impl="chunked")
  ref = lambda a, x, h0: scan.linear_scan(a, x, initial_state=h0, impl="reference")
  _compare(par, ref, (a, x, h0), (0, 1, 2), mesh)


@pytest.mark.parametrize("n,gate", [pytest.param(2, "scalar", marks=SLOW), (4, "scalar"),
                                    (4, "per_key"), pytest.param(2, "fixed", marks=SLOW),
                                    pytest.param(2, "none", marks=SLOW)])
def test_gla(n, gate):
  ks = _keys(1, 5)
  q = jax.random.normal(ks[0], (B, T, 1, K))          # one q/k head for H value heads
  k = jax.random.normal(ks[1], (B, T, 1, K))
  v = jax.random.normal(ks[2], (B, T, H, V))
  shape = {"scalar": (B, T, H), "per_key": (B, T, H, K), "fixed": (H,)}.get(gate)
  g = None
  if shape is not None:
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], shape) + 2.0)
    if gate != "fixed":
      g = _with_resets(g)
  h0 = jax.random.normal(ks[4], (B, H, K, V))
  mesh = _mesh(n)
  par = lambda q, k, v, g, h0: sp.gla(q, k, v, g, mesh=mesh, initial_state=h0, chunk_size=4,
                                      impl="chunked")
  ref = lambda q, k, v, g, h0: la.gla(q, k, v, g, initial_state=h0, impl="reference")
  diff = (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)
  _compare(par, ref, (q, k, v, g, h0), diff, mesh)


def test_rwkv6():
  ks = _keys(2, 6)
  r, k = (jax.random.normal(kk, (B, T, H, K)) for kk in ks[:2])
  v = jax.random.normal(ks[2], (B, T, H, V))
  w = _with_resets(jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, K)) + 2.0))
  u = jax.random.normal(ks[4], (H, K))
  h0 = jax.random.normal(ks[5], (B, H, K, V))
  mesh = _mesh(4)
  par = lambda *a: sp.rwkv6(*a[:5], mesh=mesh, initial_state=a[5], chunk_size=4,
                            impl="chunked")
  ref = lambda *a: la.rwkv6(*a[:5], initial_state=a[5], impl="reference")
  _compare(par, ref, (r, k, v, w, u, h0), (0, 1, 2, 3, 4, 5), mesh)


@pytest.mark.parametrize("n,gated", [pytest.param(2, True, marks=SLOW), (4, True),
                                     pytest.param(4, False, marks=SLOW)])
def test_delta_rule(n, gated):
  ks = _keys(3, 6)
  q = jax.random.normal(ks[0], (B, T, 1, K))
  k = jax.random.normal(ks[1], (B, T, 1, K))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (B, T, H, V))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
  g = _with_resets(jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, T, H)) + 2.0)) if gated \
      else None
  h0 = jax.random.normal(ks[5], (B, H, K, V))
  mesh = _mesh(n)
  par = lambda q, k, v, beta, g, h0: sp.delta_rule(q, k, v, beta, g, mesh=mesh,
                                                   initial_state=h0, chunk_size=4,
                                                   impl="chunked")
  ref = lambda q, k, v, beta, g, h0: delta_ops.delta_rule(q, k, v, beta, g, initial_state=h0,
                                                          impl="reference")
  diff = (0, 1, 2, 3, 5) if g is None else (0, 1, 2, 3, 4, 5)
  _compare(par, ref, (q, k, v, beta, g, h0), diff, mesh)


@pytest.mark.parametrize("n", N)
def test_selective_scan(n):
  ks = _keys(4, 8)
  d, m = 5, 3
  u = jax.random.normal(ks[0], (B, T, d))
  delta = jax.random.normal(ks[1], (B, T, d))
  # A large step on the shard edge t = 8: exp(Δ A) <= exp(-200 min|A|), a (near) reset that
  # the shard's transition must carry.
  delta = delta.at[:, 8].set(200.0)
  a = -jnp.exp(jax.random.normal(ks[2], (d, m)))
  bm, cm = (jax.random.normal(kk, (B, T, m)) for kk in ks[3:5])
  dskip, bias = (jax.random.normal(kk, (d,)) for kk in ks[5:7])
  h0 = jax.random.normal(ks[7], (B, d, m))
  mesh = _mesh(n)
  par = lambda *x: sp.selective_scan(*x[:6], mesh=mesh, delta_bias=x[6], delta_softplus=True,
                                     initial_state=x[7], chunk_size=4, impl="chunked")
  ref = lambda *x: ssm.selective_scan(*x[:6], delta_bias=x[6], delta_softplus=True,
                                      initial_state=x[7], impl="reference")
  _compare(par, ref, (u, delta, a, bm, cm, dskip, bias, h0), tuple(range(8)), mesh)


@pytest.mark.parametrize("n,taps", [pytest.param(2, 4, marks=SLOW), (4, 5)])
def test_causal_conv(n, taps):
  ks = _keys(5, 3)
  d = 3
  u = jax.random.normal(ks[0], (B, T, d))
  w = jax.random.normal(ks[1], (taps, d))
  h0 = jax.random.normal(ks[2], (B, taps - 1, d))
  mesh = _mesh(n)
  par = lambda u, w, h0: sp.causal_conv(u, w, mesh=mesh, initial_state=h0, impl="reference")
  ref = lambda u, w, h0: conv.causal_conv(u, w, initial_state=h0, impl="reference")
  _compare(par, ref, (u, w, h0), (0, 1, 2), mesh)


@pytest.mark.parametrize("n,strong", [pytest.param(2, "edge", marks=SLOW), (4, "edge"),
                                      pytest.param(4, "inside", marks=SLOW),
                                      (4, "weak")])
def test_mlstm(n, strong):
  """Outputs, final (C, n, m) and grads, with forget resets (f = −inf) on the shard edges and a
  strong input gate (i = 30) whose write must set the stabiliser of the later shards: on the
  edge t = 8 (a shard's first token) or inside a shard (t = 6). "weak": every write weak
  (i = −20) and m_0 = −5, so each shard's own write max lies below its summed log forget gate
  and the stabiliser must come from the entering state (a shard pass started from m = 0
  instead of "no write yet" gives a wrong final m).

  The shards run the reference form: with i = 30 the op's own chunked form is ~2e-5 from the
  reference in these grads (the stabiliser's max and the den clip are ill-conditioned there),
  which would hide the sharding maths this test checks."""
  ks = _keys(7, 9)
  q, k = (jax.random.normal(kk, (B, T, H, K)) for kk in ks[:2])
  v = jax.random.normal(ks[2], (B, T, H, V))
  i = jax.random.normal(ks[3], (B, T, H))
  f = jax.random.normal(ks[4], (B, T, H)) + 3.0
  h0 = (jax.random.normal(ks[5], (B, H, K, V)), jax.random.normal(ks[6], (B, H, K)),
        jax.random.normal(ks[7], (B, H)))
  if strong == "weak":
    i = jnp.full_like(i, -20.0)
    h0 = h0[:2] + (jnp.full((B, H), -5.0),)
  else:
    i = i.at[:, 8 if strong == "edge" else 6].set(30.0)
    f = _with_resets(f)
  mesh = _mesh(n)
  par = lambda q, k, v, i, f, c0, n0, m0: sp.mlstm(q, k, v, i, f, mesh=mesh,
                                                   initial_state=(c0, n0, m0),
                                                   impl="reference")
  ref = lambda q, k, v, i, f, c0, n0, m0: mlstm_ops.mlstm(q, k, v, i, f,
                                                          initial_state=(c0, n0, m0),
                                                          impl="reference")
  args = (q, k, v, i, f) + h0
  out_r = jax.jit(ref)(*args)
  cot = jax.tree.map(lambda x, kk=ks[8]: jax.random.normal(kk, x.shape), out_r)

  def grads(fn):
    loss = lambda *a: sum(jnp.sum(o * c) for o, c in zip(jax.tree.leaves(fn(*a)),
                                                           jax.tree.leaves(cot)))
    return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)

  with jax.set_mesh(mesh):
    out = jax.jit(par)(*args)
    g = grads(par)
  assert_trees_rel_close(out, out_r, RTOL, "outputs and final (C, n, m)")
  assert_trees_rel_close(g, grads(ref), RTOL, "grads")


def test_explicit_mesh_axes():
  ks = _keys(6, 3)
  q, k = (jax.random.normal(kk, (B, T, H, K)) for kk in ks[:2])
  v = jax.random.normal(ks[2], (B, T, H, V))
  g = _with_resets(jnp.full((B, T, H), -0.1))
  mesh = _mesh(2, AxisType.Explicit)
  par = lambda q, k, v, g: sp.gla(q, k, v, g, mesh=mesh, chunk_size=4, impl="chunked")
  ref = lambda q, k, v, g: la.gla(q, k, v, g, impl="reference")
  _compare(par, ref, (q, k, v, g), (0, 1, 2, 3), mesh)


def test_bad_arguments():
  u = jnp.zeros((B, 6, 3))
  with pytest.raises(ValueError, match="T=6 must be divisible by the 4 devices"):
    sp.causal_conv(u, jnp.zeros((2, 3)), mesh=_mesh(4))
  with pytest.raises(ValueError, match="needs the 3 before it"):
    sp.causal_conv(jnp.zeros((B, 4, 3)), jnp.zeros((4, 3)), mesh=_mesh(2))
