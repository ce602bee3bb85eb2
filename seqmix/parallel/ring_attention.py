"""Context-parallel softmax attention over the `sequence` mesh axis: ring and all-gather.

The sequence of q, k, v is split over the n devices of the `sequence` mesh axis. Each device
keeps its queries and computes attention against every key block it needs; partial results
over disjoint key blocks are merged exactly through `blockwise_attention`'s (o, lse) with
`merge_partials` (DESIGN.md, "Op contract").

Forms (`context_parallel`):
  ring       K/V (and kv segment ids) travel around the ring with `lax.ppermute`, one block per
             step, so no device ever holds more than two K/V blocks; each step's attention
             overlaps the transfer of the next block (XLA schedules the async collective).
  allgather  one `lax.all_gather` of K/V, then attention of the local queries against all keys.
             Simpler and fewer, larger messages; every device holds the whole K/V.

Layouts of the local shards (`layout`):
  contiguous  device i holds tokens [i·T/n, (i+1)·T/n).
  zigzag      the sequence is cut into 2n chunks of c = T/(2n) tokens and device i holds chunks
              i and 2n−1−i. Under causal attention every device then does the same work: at ring
              step 0 three chunk pairs (two diagonal, one full), at every later step exactly two
              full chunk pairs (only pairs whose key chunk is not after the query chunk are run).
              In the contiguous layout device n−1 does n times the work of device 0.

`ring_attention` / `context_parallel_attention` take global arrays in natural order, sharded
contiguously; with `load_balance=True` and causal attention without a window they move the
local shards to the zigzag layout and back inside the shard_map (`contiguous_to_zigzag`: two
ppermutes of half a shard each way). A model that keeps its activations in zigzag order end to
end calls `ring_attention_shard(layout="zigzag")` inside its own `shard_map` instead
(`zigzag_order` / `zigzag_restore` permute global arrays, e.g. the tokens once at the input).

Sliding window W (contiguous layout): a query block reaches back ceil((W − 1) / (T/n)) blocks, so
the ring stops after that many rotations instead of n − 1. With a window the top-level functions
use the contiguous layout (the window already balances the work); the zigzag layout with a
window is correct but runs the whole ring.

Backward pass (`backward=`): "autodiff" differentiates the ring (the transpose of `ppermute`
is the reverse `ppermute`, of `all_gather` a reduce-scatter) and so keeps each step's K/V block
for the backward pass, O(T/n · steps) K/V memory per device. "ring" is a custom_vjp that keeps
only the local q, k, v, o, lse: the backward pass rotates K/V again, recomputes each step's
blocks under `jax.vjp` (cotangents w·do for the block's o and w·(dlse + do·o_blk − do·o) for its
lse, w = exp(lse_blk − lse)), and the K/V gradients travel with their block and are sent home
by one ppermute at the end. The all-gather form is differentiated by autodiff.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from seqmix.ops.attention import blockwise_attention
from seqmix.ops.attention import merge_partials
from seqmix.parallel import _shard

CONTEXT_PARALLEL = ("ring", "allgather")
LAYOUTS = ("contiguous", "zigzag")


def zigzag_order(x, n, axis=1):
  """Natural token order -> zigzag layout for n devices (device i: chunks i and 2n−1−i).

  x [..., T, ...] with T divisible by 2n along `axis`; returns the same shape.
  """
  return _permute_chunks(x, n, axis, _zigzag_chunks(n))


def zigzag_restore(x, n, axis=1):
  """Inverse of `zigzag_order`."""
  order = _zigzag_chunks(n)
  inverse = [order.index(c) for c in range(2 * n)]
  return _permute_chunks(x, n, axis, inverse)


def _zigzag_perms(n):
  """ppermute pairs moving chunk 2i (perm A) and chunk 2i+1 (perm B) of device i to the device
  that holds them in the zigzag layout (chunk x lives on device x if x < n, else 2n−1−x)."""
  dest = lambda x: x if x < n else 2 * n - 1 - x
  return [(i, dest(2 * i)) for i in range(n)], [(i, dest(2 * i + 1)) for i in range(n)]


def contiguous_to_zigzag(tree, axis_name="sequence"):
  """Local shards, contiguous layout -> zigzag layout; inside `shard_map` over `axis_name`.

  tree: arrays (or None) [B, Tl, ...] with Tl even. Device i holds chunks 2i and 2i+1; each goes
  to its zigzag device with one ppermute (two in all), so no device moves more than its shard.
  Device d receives chunks d and 2n−1−d; they differ in parity, so the even one came by perm A.
  """
  n = lax.axis_size(axis_name)
  even = lax.axis_index(axis_name) % 2 == 0
  perm_a, perm_b = _zigzag_perms(n)

  def one(x):
    if x is None:
      return None
    c = x.shape[1] // 2
    ra = lax.ppermute(x[:, :c], axis_name, perm_a)
    rb = lax.ppermute(x[:, c:], axis_name, perm_b)
    return jnp.where(even, jnp.concatenate([ra, rb], 1), jnp.concatenate([rb, ra], 1))

  return jax.tree.map(one, tree, is_leaf=lambda x: x is None)


def zigzag_to_contiguous(tree, axis_name="sequence"):
  """Inverse of `contiguous_to_zigzag`."""
  n = lax.axis_size(axis_name)
  even = lax.axis_index(axis_name) % 2 == 0
  perm_a, perm_b = _zigzag_perms(n)
  inverse = lambda perm: [(d, s) for s, d in perm]

  def one(x):
    if x is None:
      return None
    c = x.shape[1] // 2
    s0, s1 = x[:, :c], x[:, c:]                      # chunks d and 2n−1−d
    lo = lax.ppermute(jnp.where(even, s0, s1), axis_name, inverse(perm_a))
    hi = lax.ppermute(jnp.where(even, s1, s0), axis_name, inverse(perm_b))
    return jnp.concatenate([lo, hi], 1)

  return jax.tree.map(one, tree, is_leaf=lambda x: x is None)


def _zigzag_chunks(n):
  """Chunk indices in device order: [0, 2n−1, 1, 2n−2, ...]."""
  return [c for i in range(n) for c in (i, 2 * n - 1 - i)]


def _permute_chunks(x, n, axis, order):
  t = x.shape[axis]
  if t % (2 * n):
    raise ValueError(f"zigzag layout: the sequence length T={t} must be divisible by 2n={2 * n} "
                     f"(two chunks per device on {n} devices); pad T or use "
                     f"load_balance=False.")
  chunks = jnp.split(x, 2 * n, axis=axis)   # 2n x [..., T/(2n), ...]
  return jnp.concatenate([chunks[j] for j in order], axis=axis)


def context_parallel_attention(q, k, v, *, mesh, context_parallel="ring", causal=True,
                               scale=None, window=None, segment_ids=None, load_balance=True,
                               impl="chunked", axis_name="sequence", batch_axes=None,
                               head_axes=None, backward="autodiff"):
  """Self-attention with its sequence sharded over `axis_name` of `mesh`.

  Args:
    q: [B, T, H, K] queries (global array, natural token order).
    k: [B, T, G, K] keys, H % G == 0 (GQA / MQA).
    v: [B, T, G, V] values.
    mesh: a `jax.sharding.Mesh` with an axis `axis_name` of size n; T must be divisible by n
      (by 2n with load balancing). Explicit mesh axes: inputs are resharded with
      `jax.sharding.reshard` (differentiate under `jax.set_mesh(mesh)`); Auto axes: shard_map
      reshards them.
    context_parallel: "ring" (ppermute K/V around the ring) or "allgather".
    causal, scale, window, segment_ids ([B, T] int): as `seqmix.ops.attention.attention`.
    load_balance: use the zigzag layout for causal attention without a window.
    impl: `blockwise_attention` impl run on every block ("chunked", "reference", ...).
    axis_name: the mesh axis the sequence is split over.
    batch_axes, head_axes: mesh axes (or None) the batch and head dims are sharded over.
    backward: ring only: "autodiff" or "ring" (custom_vjp; see `ring_attention_shard`).

  Returns:
    (o [B, T, H, V] in v's dtype, lse [B, T, H] float32), natural token order.
  """
  if context_parallel not in CONTEXT_PARALLEL:
    raise ValueError(f"context_parallel={context_parallel!r}: choose one of {CONTEXT_PARALLEL}.")
  n = _shard.check_axis(mesh, axis_name, "context parallel attention")
  t = q.shape[1]
  if k.shape[1] != t or v.shape[1] != t:
    raise ValueError(f"context parallel attention is self-attention: q, k, v need one length "
                     f"T; got {q.shape=}, {k.shape=}, {v.shape=}.")
  if t % n:
    raise ValueError(f"context parallel attention: T={t} must be divisible by the {n} devices "
                     f"of mesh axis {axis_name!r}.")
  layout = "zigzag" if (load_balance and causal and window is None and n > 1) else "contiguous"
  if layout == "zigzag" and t % (2 * n):
    raise ValueError(f"zigzag layout: the sequence length T={t} must be divisible by 2n={2 * n} "
                     f"(two chunks per device on {n} devices); pad T or use "
                     f"load_balance=False.")
  spec = P(batch_axes, axis_name, head_axes, None)
  out_specs = (spec, P(batch_axes, axis_name, head_axes))
  if context_parallel == "ring":
    shard = functools.partial(ring_attention_shard, backward=backward)
  else:
    shard = allgather_attention_shard

  def local(q, k, v, ids):
    if layout == "zigzag":
      q, k, v, ids = contiguous_to_zigzag((q, k, v, ids), axis_name)
    o, lse = shard(q, k, v, causal=causal, scale=scale, window=window, segment_ids=ids,
                   layout=layout, impl=impl, axis_name=axis_name)
    if layout == "zigzag":
      o, lse = zigzag_to_contiguous((o, lse), axis_name)
    return o, lse

  return _shard.smap(local, mesh, (q, k, v, segment_ids),
                     (spec, spec, spec, P(batch_axes, axis_name)), out_specs)


def ring_attention(q, k, v, **kwargs):
  """`context_parallel_attention` with context_parallel="ring"."""
  return context_parallel_attention(q, k, v, context_parallel="ring", **kwargs)


def allgather_attention(q, k, v, **kwargs):
  """`context_parallel_attention` with context_parallel="allgather"."""
  return context_parallel_attention(q, k, v, context_parallel="allgather", **kwargs)


def _attend(q, k, v, q_ids, kv_ids, q_off, kv_off, opts):
  seg = None if q_ids is None else (q_ids, kv_ids)
  o, lse = blockwise_attention(q, k, v, causal=opts["causal"], scale=opts["scale"],
                               window=opts["window"], segment_ids=seg, q_offset=q_off,
                               kv_offset=kv_off, impl=opts["impl"])
  return o.astype(jnp.float32), lse


def _check_layout(layout, tl):
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}: choose one of {LAYOUTS}.")
  if layout == "zigzag" and tl % 2:
    raise ValueError(f"zigzag layout: the local length T/n={tl} must be even (two chunks per "
                     "device).")


def ring_attention_shard(q, k, v, *, causal=True, scale=None, window=None, segment_ids=None,
                         layout="contiguous", impl="chunked", axis_name="sequence",
                         backward="autodiff"):
  """Ring attention on local shards; call inside `shard_map` over `axis_name`.

  Args:
    q: [B, Tl, H, K] this device's queries, Tl = T / n, in `layout`.
    k, v: [B, Tl, G, K], [B, Tl, G, V] this device's keys and values.
    segment_ids: [B, Tl] int ids of this device's tokens, or None.
    layout: "contiguous" or "zigzag" (module docstring); zigzag with causal=False runs as
      contiguous would (all pairs), it only changes the positions.
    backward: "autodiff" (differentiate the ring: every step's K/V block is kept for the
      backward pass) or "ring" (a custom_vjp that keeps only the local q, k, v, o, lse and
      rotates K/V again in the backward pass, with their gradients travelling alongside and
      sent home at the end; each step's blocks are recomputed under `jax.vjp`).
    Others: as `context_parallel_attention`.

  Returns:
    (o [B, Tl, H, V] in v's dtype, lse [B, Tl, H] float32) for the local queries.
  """
  tl = q.shape[1]
  _check_layout(layout, tl)
  if backward not in ("autodiff", "ring"):
    raise ValueError(f"backward={backward!r}: choose 'autodiff' or 'ring'.")
  n = lax.axis_size(axis_name)
  opts = dict(causal=causal, scale=scale, window=window, impl=impl)
  perm = [(d, (d + 1) % n) for d in range(n)]
  rotate = lambda tree: lax.ppermute(tree, axis_name, perm)   # block of device d -> d + 1
  steps = n
  if layout == "contiguous" and causal and window is not None:
    steps = min(n, 1 + math.ceil((int(window) - 1) / tl))     # blocks a window reaches back
  # The device index is taken inside each traced function (the custom_vjp's fwd and bwd must
  # not close over a tracer).
  step_partial = lambda: functools.partial(_ring_step_partial, layout=layout,
                                           i=lax.axis_index(axis_name), n=n, tl=tl, opts=opts)

  def forward(q, k, v, ids):
    partial = step_partial()
    o, lse = partial(q, ids, (k, v, ids), 0)

    def step(carry, s):
      kv, o, lse = carry
      kv = rotate(kv)
      o, lse = merge_partials(o, lse, *partial(q, ids, kv, s))
      return (kv, o, lse), None

    (_, o, lse), _ = lax.scan(step, ((k, v, ids), o, lse), jnp.arange(1, steps))
    return o, lse

  if backward == "autodiff":
    o, lse = forward(q, k, v, segment_ids)
    return o.astype(v.dtype), lse

  @jax.custom_vjp
  def ring(q, k, v, ids):
    return forward(q, k, v, ids)

  def ring_fwd(q, k, v, ids):
    o, lse = forward(q, k, v, ids)
    return (o, lse), (q, k, v, ids, o, lse)

  def ring_bwd(res, cts):
    q, k, v, ids, o, lse = res
    do, dlse = cts
    partial = step_partial()
    do = do.astype(jnp.float32)
    do_o = jnp.sum(do * o, axis=-1)                                  # [b, tl, h]
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def step_grads(kv, s):
      # o = Σ_s w_s o_s with w_s = exp(lse_s − lse): o_s gets w_s do, lse_s gets
      # w_s (dlse + do·o_s − do·o).
      (o_s, lse_s), vjp = jax.vjp(lambda q, k, v: partial(q, ids, (k, v, kv[2]), s), q,
                                  kv[0], kv[1])
      w = jnp.where(jnp.isfinite(lse_s), jnp.exp(lse_s - lse_safe), 0.0)
      d_lse_s = w * (dlse + jnp.sum(do * o_s, axis=-1) - do_o)
      return vjp((w[..., None] * do, d_lse_s))

    dq, dk, dv = step_grads((k, v, ids), 0)

    def step(carry, s):
      kv, dkv, dq = carry
      kv, dkv = rotate(kv), rotate(dkv)
      dq_s, dk_s, dv_s = step_grads(kv, s)
      return (kv, (dkv[0] + dk_s, dkv[1] + dv_s), dq + dq_s), None

    (_, (dk, dv), dq), _ = lax.scan(step, ((k, v, ids), (dk, dv), dq), jnp.arange(1, steps))
    if steps > 1:
      # Device d holds the gradients of the block of device d − (steps − 1): send them home.
      home = [(d, (d - (steps - 1)) % n) for d in range(n)]
      dk, dv = lax.ppermute((dk, dv), axis_name, home)
    return dq, dk, dv, None

  ring.defvjp(ring_fwd, ring_bwd)
  o, lse = ring(q, k, v, segment_ids)
  return o.astype(v.dtype), lse


def _ring_step_partial(q, ids, kv, s, *, layout, i, n, tl, opts):
  """Attention of the local queries to the K/V block held at ring step s (from device i − s).

  q [B, Tl, H, K], ids [B, Tl] | None, kv = (k, v, kv_ids) of that block; s = 0 is a Python int
  (the own block: in the zigzag layout its diagonal pairs differ from the other steps'), later
  steps may be traced. Returns (o [B, Tl, H, V] float32, lse [B, Tl, H]) over that block.
  """
  k, v, kv_ids = kv
  j = (i - s) % n                                              # owner of the block held now
  if layout == "contiguous":
    return _attend(q, k, v, ids, kv_ids, i * tl, j * tl, opts)
  c = tl // 2
  split = lambda x: (None, None) if x is None else (x[:, :c], x[:, c:])
  qa, qb = split(q)
  ida, idb = split(ids)
  ka, kb = split(k)
  va, vb = split(v)
  kida, kidb = split(kv_ids)
  pos_a, pos_b = i * c, (2 * n - 1 - i) * c                    # chunk i and chunk 2n−1−i
  kpos_a, kpos_b = j * c, (2 * n - 1 - j) * c
  causal = opts["causal"]
  if isinstance(s, int) and s == 0:
    # Own keys. Causal: (a, a) and (b, b) are diagonal, (b, a) full, (a, b) empty.
    o_a, lse_a = _attend(qa, ka, va, ida, kida, pos_a, pos_a, opts)
    o_b, lse_b = merge_partials(*_attend(qb, ka, va, idb, kida, pos_b, pos_a, opts),
                                *_attend(qb, kb, vb, idb, kidb, pos_b, pos_b, opts))
    if not causal:
      o_a, lse_a = merge_partials(o_a, lse_a, *_attend(qa, kb, vb, ida, kidb, pos_a, pos_b, opts))
  elif not causal:
    o_a, lse_a = merge_partials(*_attend(qa, ka, va, ida, kida, pos_a, kpos_a, opts),
                                *_attend(qa, kb, vb, ida, kidb, pos_a, kpos_b, opts))
    o_b, lse_b = merge_partials(*_attend(qb, ka, va, idb, kida, pos_b, kpos_a, opts),
                                *_attend(qb, kb, vb, idb, kidb, pos_b, kpos_b, opts))
  else:
    # Key chunk j is before both query chunks: (b, a_j) always has visible pairs. The one other
    # non-empty pair is (a, a_j) when j < i, else (b, b_j): select its inputs so every device
    # runs one chunk pair for it (no device-dependent control flow).
    o_b, lse_b = _attend(qb, ka, va, idb, kida, pos_b, kpos_a, opts)
    before = j < i
    pick = lambda x, y: None if x is None else jnp.where(before, x, y)
    o_x, lse_x = _attend(pick(qa, qb), pick(ka, kb), pick(va, vb), pick(ida, idb),
                         pick(kida, kidb), jnp.where(before, pos_a, pos_b),
                         jnp.where(before, kpos_a, kpos_b), opts)
    none = jnp.full_like(lse_x, -jnp.inf)
    o_a, lse_a = o_x, jnp.where(before, lse_x, none)
    o_b, lse_b = merge_partials(o_b, lse_b, o_x, jnp.where(before, none, lse_x))
  return jnp.concatenate([o_a, o_b], axis=1), jnp.concatenate([lse_a, lse_b], axis=1)


def allgather_attention_shard(q, k, v, *, causal=True, scale=None, window=None,
                              segment_ids=None, layout="contiguous", impl="chunked",
                              axis_name="sequence"):
  """All-gather context parallelism on local shards; call inside `shard_map`.

  Arguments and returns as `ring_attention_shard`. K/V (and segment ids) of all devices are
  gathered, put back in natural token order, and the local queries attend to all of them.
  """
  tl = q.shape[1]
  _check_layout(layout, tl)
  n = lax.axis_size(axis_name)
  i = lax.axis_index(axis_name)
  opts = dict(causal=causal, scale=scale, window=window, impl=impl)
  gather = lambda x: None if x is None else lax.all_gather(x, axis_name, axis=1, tiled=True)
  k_all, v_all, ids_all = gather(k), gather(v), gather(segment_ids)   # [b, t, ...]
  if layout == "contiguous":
    o, lse = _attend(q, k_all, v_all, segment_ids, ids_all, i * tl, 0, opts)
    return o.astype(v.dtype), lse
  k_all, v_all = zigzag_restore(k_all, n), zigzag_restore(v_all, n)
  if ids_all is not None:
    ids_all = zigzag_restore(ids_all, n)
  c = tl // 2
  ida, idb = (None, None) if segment_ids is None else (segment_ids[:, :c], segment_ids[:, c:])
  o_a, lse_a = _attend(q[:, :c], k_all, v_all, ida, ids_all, i * c, 0, opts)
  o_b, lse_b = _attend(q[:, c:], k_all, v_all, idb, ids_all, (2 * n - 1 - i) * c, 0, opts)
  o = jnp.concatenate([o_a, o_b], axis=1)
  return o.astype(v.dtype), jnp.concatenate([lse_a, lse_b], axis=1)
