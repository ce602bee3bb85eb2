"""Sequence parallelism for the linear-recurrent ops: state passing across shards.

The sequence is split contiguously over the n devices of the `sequence` mesh axis (device i holds
tokens [i·T/n, (i+1)·T/n)). Every recurrence here maps the state entering a shard affinely onto
the state leaving it, S_out = M_i S_in + S_i, and its outputs depend on S_in linearly. So:

  1. each device runs the op on its shard from a zero state: local outputs and S_i;
  2. it computes its shard's transition M_i (the product of the per-step decays; for the delta
     rule the K×K product of the (I − β kᵀk)·exp(g) steps);
  3. one all-gather of (M_i, S_i); every device chains S_in(0) = initial state,
     S_in(j+1) = M_j S_in(j) + S_j (n small steps) and takes its own S_in(i); the last is the
     final state;
  4. the correction: outputs += the op's response to S_in alone.

Steps 2 and 4 reuse the op itself with the write zeroed (v = 0, x = 0, u = 0): from an initial
state X, such a pass carries X only through the decays/transitions, so its outputs are exactly
the correction (`gla`: scale · (q ⊙ cumulative decay) S_in; `linear_scan`: (running product of
a) · h_in) and its final state from X = 1 (or the identity) is M_i. This costs one or two more
passes of the op per shard, in exchange for one code path per op that any impl ("chunked",
"pallas", ...) inherits unchanged; a fused correction is an optimisation left for later.

A reset (gate −inf, a = 0) anywhere, including the first token of a shard, makes M_i (near)
zero and the correction vanish, exactly as in the single-device op.

`mlstm` is affine in its unstabilised state (exp(m) C, exp(m) n) but its output is not (it
divides by max(|q n|, exp(−m))), and its stabiliser m is a running max. So each shard first
runs the op from (0, 0, m = −1e30) (a stabiliser below any write, so it ends at the max of
the shard's own writes, m_w, with the writes C_w, n_w stabilised by it) and sums its log
forget gates, F; the all-gather of (C_w, n_w, m_w, F) is chained with the op's own
inter-chunk rule, m' = max(F + m, m_w), C' = e^{F+m−m'} C + e^{m_w−m'} C_w (n alike), so the
state entering every shard is the single-device one, stabiliser included; a second pass of
the op from that state gives the outputs.

`causal_conv` has no state to pass: each shard receives the L−1 rows before it from its left
neighbour (one ppermute, the halo) and device 0 takes them from the initial state.

Each function takes global arrays like its op plus `mesh`, `axis_name` and the mesh axes of the
batch (and head) dims; the `*_shard` functions run on local shards inside a caller's shard_map.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from seqmix.ops import _chunk
from seqmix.ops import conv as _conv
from seqmix.ops import delta_rule as _delta
from seqmix.ops import linear_attention as _la
from seqmix.ops import mlstm as _mlstm
from seqmix.ops import scan as _scan
from seqmix.ops import ssm as _ssm
from seqmix.parallel import _shard

_F32 = jnp.float32


def _chain(local_state, transition, initial_state, apply, axis_name):
  """The state entering this device's shard and the final state, from one all-gather.

  local_state: this shard's final state from a zero start; transition: its M_i; apply(M, S)
  -> M S. Every device chains all n shards (n small steps on states), so all agree on the
  final state.
  """
  n = lax.axis_size(axis_name)
  states = lax.all_gather(local_state, axis_name)        # [n, ...]
  trans = lax.all_gather(transition, axis_name)          # [n, ...]
  s = initial_state
  entering = []
  for j in range(n):
    entering.append(s)
    s = apply(trans[j], s) + states[j]
  return jnp.stack(entering)[lax.axis_index(axis_name)], s


def _diag(m, s):
  return m * s


def linear_scan_shard(a, x, *, initial_state=None, chunk_size=64, impl="auto",
                      axis_name="sequence"):
  """Sequence-parallel `linear_scan` on local shards (inside shard_map over `axis_name`).

  a, x: [B, Tl, ...] this device's shard; initial_state [B, ...] (replicated) or None.
  Returns (h [B, Tl, ...], h_T [B, ...]) as `seqmix.ops.scan.linear_scan`.
  """
  shape = jnp.broadcast_shapes(a.shape, x.shape)
  cdt = _scan._compute_dtype(a, x, initial_state)
  out_dtype = cdt if (cdt == jnp.complex64 and not jnp.iscomplexobj(x)) else x.dtype
  a = jnp.broadcast_to(a.astype(cdt), shape)
  x = jnp.broadcast_to(x.astype(cdt), shape)
  state_shape = (shape[0],) + shape[2:]
  h0 = jnp.zeros(state_shape, cdt) if initial_state is None else initial_state.astype(cdt)
  kw = dict(chunk_size=chunk_size, impl=impl)
  h_loc, s_loc = _scan.linear_scan(a, x, **kw)
  # Running product of a within the shard: the scan of a with x = 0 from h = 1.
  a_cum, a_tot = _scan.linear_scan(a, jnp.zeros_like(x), initial_state=jnp.ones(state_shape, cdt),
                                   **kw)
  h_in, h_last = _chain(s_loc, a_tot, h0, _diag, axis_name)
  h = h_loc + a_cum * h_in[:, None]
  return h.astype(out_dtype), h_last


def linear_scan(a, x, *, mesh, initial_state=None, chunk_size=64, impl="auto",
                axis_name="sequence", batch_axes=None):
  """`seqmix.ops.scan.linear_scan` with time sharded over `axis_name` of `mesh`.

  T must be divisible by the axis size. Returns (h [B, T, ...], h_T [B, ...]).
  """
  n = _shard.check_axis(mesh, axis_name, "sequence-parallel linear_scan")
  _check_len("linear_scan", max(a.shape[1], x.shape[1]), n, axis_name)
  seq, state = P(batch_axes, axis_name), P(batch_axes)
  fn = lambda a, x, h0: linear_scan_shard(a, x, initial_state=h0, chunk_size=chunk_size,
                                          impl=impl, axis_name=axis_name)
  return _shard.smap(fn, mesh, (a, x, initial_state), (seq, seq, state), (seq, state))


def gla_shard(q, k, v, g=None, *, scale=None, initial_state=None, chunk_size=64, impl="auto",
              axis_name="sequence"):
  """Sequence-parallel `gla` on local shards (inside shard_map over `axis_name`).

  q, k [B, Tl, G, K], v [B, Tl, H, V], g None / [H] / [B, Tl, H] / [B, Tl, H, K] local;
  initial_state [B, H, K, V] or None. Returns (o [B, Tl, H, V], final state [B, H, K, V]).
  """
  b, tl, h, vd = v.shape
  kd = q.shape[-1]
  kw = dict(scale=scale, chunk_size=chunk_size, impl=impl)
  o_loc, s_loc = _la.gla(q, k, v, g, **kw)
  s0 = jnp.zeros((b, h, kd, vd), _F32) if initial_state is None else initial_state.astype(_F32)
  if g is None:
    decay = jnp.ones((b, h, kd, 1), _F32)
  else:
    # diag of the shard's decay: the state of a write-free pass from all ones. [b, h, k, 1]
    _, decay = _la.gla(q, k, jnp.zeros((b, tl, h, 1), _F32), g,
                       initial_state=jnp.ones((b, h, kd, 1), _F32), **kw)
  s_in, s_last = _chain(s_loc, decay, s0, _diag, axis_name)
  o_corr, _ = _la.gla(q, k, jnp.zeros(v.shape, _F32), g, initial_state=s_in, **kw)
  return (o_loc.astype(_F32) + o_corr).astype(v.dtype), s_last


def gla(q, k, v, g=None, *, mesh, scale=None, initial_state=None, chunk_size=64, impl="auto",
        axis_name="sequence", batch_axes=None, head_axes=None):
  """`seqmix.ops.linear_attention.gla` with time sharded over `axis_name` of `mesh`."""
  n = _shard.check_axis(mesh, axis_name, "sequence-parallel gla")
  _check_len("gla", q.shape[1], n, axis_name)
  x4, st = P(batch_axes, axis_name, head_axes, None), P(batch_axes, head_axes, None, None)
  g_spec = None if g is None else {1: P(head_axes), 3: P(batch_axes, axis_name, head_axes),
                                   4: x4}[g.ndim]
  fn = lambda q, k, v, g, h0: gla_shard(q, k, v, g, scale=scale, initial_state=h0,
                                        chunk_size=chunk_size, impl=impl, axis_name=axis_name)
  return _shard.smap(fn, mesh, (q, k, v, g, initial_state), (x4, x4, x4, g_spec, st), (x4, st))


def rwkv6_shard(r, k, v, w, u, *, scale=1.0, initial_state=None, chunk_size=64, impl="auto",
                axis_name="sequence"):
  """Sequence-parallel `rwkv6` on local shards (inside shard_map over `axis_name`)."""
  b, tl, h, vd = v.shape
  kd = r.shape[-1]
  kw = dict(scale=scale, chunk_size=chunk_size, impl=impl)
  o_loc, s_loc = _la.rwkv6(r, k, v, w, u, **kw)
  s0 = jnp.zeros((b, h, kd, vd), _F32) if initial_state is None else initial_state.astype(_F32)
  _, decay = _la.rwkv6(r, k, jnp.zeros((b, tl, h, 1), _F32), w, u,
                       initial_state=jnp.ones((b, h, kd, 1), _F32), **kw)   # [b, h, k, 1]
  s_in, s_last = _chain(s_loc, decay, s0, _diag, axis_name)
  # v = 0 also zeroes the bonus term u ⊙ k_tᵀ v_t: only r_t S_{t-1} of S_in remains.
  o_corr, _ = _la.rwkv6(r, k, jnp.zeros(v.shape, _F32), w, u, initial_state=s_in, **kw)
  return (o_loc.astype(_F32) + o_corr).astype(v.dtype), s_last


def rwkv6(r, k, v, w, u, *, mesh, scale=1.0, initial_state=None, chunk_size=64, impl="auto",
          axis_name="sequence", batch_axes=None, head_axes=None):
  """`seqmix.ops.linear_attention.rwkv6` with time sharded over `axis_name` of `mesh`."""
  n = _shard.check_axis(mesh, axis_name, "sequence-parallel rwkv6")
  _check_len("rwkv6", r.shape[1], n, axis_name)
  x4, st = P(batch_axes, axis_name, head_axes, None), P(batch_axes, head_axes, None, None)
  fn = lambda r, k, v, w, u, h0: rwkv6_shard(r, k, v, w, u, scale=scale, initial_state=h0,
                                             chunk_size=chunk_size, impl=impl,
                                             axis_name=axis_name)
  return _shard.smap(fn, mesh, (r, k, v, w, u, initial_state),
                     (x4, x4, x4, x4, P(head_axes, None), st), (x4, st))


def delta_rule_shard(q, k, v, beta, g=None, *, scale=None, initial_state=None, chunk_size=64,
                     impl="auto", axis_name="sequence"):
  """Sequence-parallel `delta_rule` on local shards (inside shard_map over `axis_name`).

  The shard's transition is a full K×K matrix per head, M = Π_t exp(g_t)(I − β_t k_tᵀk_t): the
  final state of a write-free pass (v = 0) from the identity. Its all-gather moves
  [n, B, H, K, K] floats beside the [n, B, H, K, V] states.
  """
  b, tl, h, vd = v.shape
  kd = q.shape[-1]
  kw = dict(scale=scale, chunk_size=chunk_size, impl=impl)
  o_loc, s_loc = _delta.delta_rule(q, k, v, beta, g, **kw)
  s0 = jnp.zeros((b, h, kd, vd), _F32) if initial_state is None else initial_state.astype(_F32)
  eye = jnp.broadcast_to(jnp.eye(kd, dtype=_F32), (b, h, kd, kd))
  _, trans = _delta.delta_rule(q, k, jnp.zeros((b, tl, h, kd), _F32), beta, g,
                               initial_state=eye, **kw)                    # [b, h, k, k]
  apply = lambda m, s: jnp.einsum("bhkl,bhlv->bhkv", m, s, precision=lax.Precision.HIGHEST)
  s_in, s_last = _chain(s_loc, trans, s0, apply, axis_name)
  o_corr, _ = _delta.delta_rule(q, k, jnp.zeros(v.shape, _F32), beta, g, initial_state=s_in,
                                **kw)
  return (o_loc.astype(_F32) + o_corr).astype(v.dtype), s_last


def delta_rule(q, k, v, beta, g=None, *, mesh, scale=None, initial_state=None, chunk_size=64,
               impl="auto", axis_name="sequence", batch_axes=None, head_axes=None):
  """`seqmix.ops.delta_rule.delta_rule` with time sharded over `axis_name` of `mesh`."""
  n = _shard.check_axis(mesh, axis_name, "sequence-parallel delta_rule")
  _check_len("delta_rule", q.shape[1], n, axis_name)
  x4, st = P(batch_axes, axis_name, head_axes, None), P(batch_axes, head_axes, None, None)
  x3 = P(batch_axes, axis_name, head_axes)
  fn = lambda q, k, v, beta, g, h0: delta_rule_shard(q, k, v, beta, g, scale=scale,
                                                     initial_state=h0, chunk_size=chunk_size,
                                                     impl=impl, axis_name=axis_name)
  return _shard.smap(fn, mesh, (q, k, v, beta, g, initial_state), (x4, x4, x4, x3, x3, st),
                     (x4, st))


def selective_scan_shard(u, delta, A, B, C, D=None, *, delta_bias=None, delta_softplus=False,
                         initial_state=None, reset=None, chunk_size=64, impl="auto",
                         axis_name="sequence"):
  """Sequence-parallel `selective_scan` on local shards (inside shard_map over `axis_name`).

  reset [B, Tl] local: all three passes see it, so a reset zeroes the shard's transition from
  that token on and the correction after it, as in the single-device op.
  """
  b, _, d = u.shape
  kw = dict(delta_bias=delta_bias, delta_softplus=delta_softplus, reset=reset,
            chunk_size=chunk_size, impl=impl)
  y_loc, s_loc = _ssm.selective_scan(u, delta, A, B, C, D, **kw)
  shape = (b, d, A.shape[1])
  s0 = jnp.zeros(shape, _F32) if initial_state is None else initial_state.astype(_F32)
  zero_u = jnp.zeros(u.shape, _F32)
  # exp(A · ΣΔ) of the shard: a pass with u = 0 from all ones. [b, d, n]
  ones = jnp.ones(shape, _F32)
  _, decay = _ssm.selective_scan(zero_u, delta, A, B, C, None, initial_state=ones, **kw)
  s_in, s_last = _chain(s_loc, decay, s0, _diag, axis_name)
  y_corr, _ = _ssm.selective_scan(zero_u, delta, A, B, C, None, initial_state=s_in, **kw)
  return (y_loc.astype(_F32) + y_corr).astype(u.dtype), s_last


def selective_scan(u, delta, A, B, C, D=None, *, mesh, delta_bias=None, delta_softplus=False,
                   initial_state=None, reset=None, chunk_size=64, impl="auto",
                   axis_name="sequence", batch_axes=None):
  """`seqmix.ops.ssm.selective_scan` with time sharded over `axis_name` of `mesh`."""
  n = _shard.check_axis(mesh, axis_name, "sequence-parallel selective_scan")
  _check_len("selective_scan", u.shape[1], n, axis_name)
  seq, rep, st = P(batch_axes, axis_name), P(), P(batch_axes)
  fn = lambda u, delta, A, B, C, D, bias, h0, reset: selective_scan_shard(
      u, delta, A, B, C, D, delta_bias=bias, delta_softplus=delta_softplus, initial_state=h0,
      reset=reset, chunk_size=chunk_size, impl=impl, axis_name=axis_name)
  return _shard.smap(fn, mesh, (u, delta, A, B, C, D, delta_bias, initial_state, reset),
                     (seq, seq, rep, seq, seq, rep, rep, st, seq), (seq, st))


# A stabiliser below every write: the op clamps log gates at _chunk.LOG_GATE_FLOOR (−80), so
# m = −1e30 is never the max once a token is written, and e^{−1e30 − m} underflows to 0.
_M_EMPTY = -1e30


def mlstm_shard(q, k, v, i, f, *, scale=None, eps=1e-6, initial_state=None, chunk_size=64,
                impl="auto", axis_name="sequence"):
  """Sequence-parallel `mlstm` on local shards (inside shard_map over `axis_name`).

  q, k [B, Tl, H, K], v [B, Tl, H, V], i, f [B, Tl, H] local; initial_state None or
  (C [B, H, K, V], n [B, H, K], m [B, H]) replicated. Returns (h [B, Tl, H, V],
  (C, n, m) final, on every device) as `seqmix.ops.mlstm.mlstm`.
  """
  b, _, h, kd = q.shape
  vd = v.shape[-1]
  kw = dict(scale=scale, eps=eps, chunk_size=chunk_size, impl=impl)
  empty = (jnp.zeros((b, h, kd, vd), _F32), jnp.zeros((b, h, kd), _F32),
           jnp.full((b, h), _M_EMPTY, _F32))
  _, (c_w, n_w, m_w) = _mlstm.mlstm(q, k, v, i, f, initial_state=empty, **kw)
  # The shard's total log forget gate, clamped as the op clamps it. [b, h]
  lf_sum = jnp.sum(jax.nn.log_sigmoid(jnp.maximum(f.astype(_F32), _chunk.LOG_GATE_FLOOR)),
                   axis=1)
  if initial_state is None:
    state = (empty[0], empty[1], jnp.zeros((b, h), _F32))
  else:
    state = tuple(x.astype(_F32) for x in initial_state)
  cs, ns, ms, fs = (lax.all_gather(x, axis_name) for x in (c_w, n_w, m_w, lf_sum))  # [n, ...]
  entering = []
  for j in range(lax.axis_size(axis_name)):
    entering.append(state)
    c, n, m = state
    m1 = jnp.maximum(fs[j] + m, ms[j])
    decay, write = jnp.exp(fs[j] + m - m1), jnp.exp(ms[j] - m1)          # [b, h]
    state = (decay[..., None, None] * c + write[..., None, None] * cs[j],
             decay[..., None] * n + write[..., None] * ns[j], m1)
  me = lax.axis_index(axis_name)
  s_in = tuple(jnp.stack(parts)[me] for parts in zip(*entering))
  out, _ = _mlstm.mlstm(q, k, v, i, f, initial_state=s_in, **kw)
  return out, state


def mlstm(q, k, v, i, f, *, mesh, scale=None, eps=1e-6, initial_state=None, chunk_size=64,
          impl="auto", axis_name="sequence", batch_axes=None, head_axes=None):
  """`seqmix.ops.mlstm.mlstm` with time sharded over `axis_name` of `mesh`."""
  n = _shard.check_axis(mesh, axis_name, "sequence-parallel mlstm")
  _check_len("mlstm", q.shape[1], n, axis_name)
  x4, x3 = P(batch_axes, axis_name, head_axes, None), P(batch_axes, axis_name, head_axes)
  st = (P(batch_axes, head_axes, None, None), P(batch_axes, head_axes, None),
        P(batch_axes, head_axes))
  c0, n0, m0 = (None, None, None) if initial_state is None else initial_state

  def fn(q, k, v, i, f, c0, n0, m0):
    h0 = None if c0 is None else (c0, n0, m0)
    return mlstm_shard(q, k, v, i, f, scale=scale, eps=eps, initial_state=h0,
                       chunk_size=chunk_size, impl=impl, axis_name=axis_name)

  return _shard.smap(fn, mesh, (q, k, v, i, f, c0, n0, m0), (x4, x4, x4, x3, x3) + st,
                     (x4, st))


def causal_conv_shard(u, k, *, initial_state=None, impl="auto", axis_name="sequence"):
  """Sequence-parallel `causal_conv` on local shards: a halo of L−1 rows from the left shard.

  u [B, Tl, D] with Tl >= L − 1 (the halo comes from one neighbour). Returns (y [B, Tl, D],
  state [B, L−1, D]): the last L−1 inputs of the whole sequence, on every device.
  """
  l1 = k.shape[0] - 1
  if l1 == 0:
    y, state = _conv.causal_conv(u, k, impl=impl)
    return y, state
  if u.shape[1] < l1:
    raise ValueError(f"sequence-parallel causal_conv: each shard holds {u.shape[1]} tokens but "
                     f"the kernel of {l1 + 1} taps needs the {l1} before it from one neighbour; "
                     "use fewer sequence shards or a longer T.")
  n = lax.axis_size(axis_name)
  i = lax.axis_index(axis_name)
  tail = u[:, u.shape[1] - l1:]                                   # [b, l-1, d]
  halo = lax.ppermute(tail, axis_name, [(j, j + 1) for j in range(n - 1)])   # device 0 gets 0
  if initial_state is not None:
    halo = jnp.where(i == 0, initial_state.astype(u.dtype), halo)
  y, _ = _conv.causal_conv(u, k, initial_state=halo, impl=impl)
  # The final state is the last shard's tail; a psum hands it to every device.
  state = lax.psum(jnp.where(i == n - 1, tail, jnp.zeros_like(tail)), axis_name)
  return y, state


def causal_conv(u, k, *, mesh, initial_state=None, impl="auto", axis_name="sequence",
                batch_axes=None):
  """`seqmix.ops.conv.causal_conv` with time sharded over `axis_name` of `mesh`."""
  n = _shard.check_axis(mesh, axis_name, "sequence-parallel causal_conv")
  _check_len("causal_conv", u.shape[1], n, axis_name)
  seq, st = P(batch_axes, axis_name), P(batch_axes)
  fn = lambda u, k, h0: causal_conv_shard(u, k, initial_state=h0, impl=impl,
                                          axis_name=axis_name)
  return _shard.smap(fn, mesh, (u, k, initial_state), (seq, P(), st), (seq, st))


def _check_len(op, t, n, axis_name):
  if t % n:
    raise ValueError(f"sequence-parallel {op}: T={t} must be divisible by the {n} devices of "
                     f"mesh axis {axis_name!r}; pad T.")
