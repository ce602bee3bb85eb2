"""Shared checks of the mixer protocol (DESIGN.md, "Mixer protocol"), used by
`tests/mixers/test_protocol.py` over every registered mixer and usable on an unregistered
mixer while it is being written:

    from seqmix.mixers import testing as mt
    m = mt.build("gla")                       # registry test_kwargs at d_model=32
    mt.check_causal(m, mt.init_params(m))

Conventions the checks pin down:
- Inputs are float32 `x [B, T, D]` drawn N(0, 1); parameters are the module's init with every
  leaf that initialises to exactly zero replaced by N(0, 0.02²) (`init_params`), so a
  zero-initialised output projection or bias cannot make a check vacuous.
- Positions are the caller's: for packed documents the caller passes positions restarting at
  0 in every document; a mixer may ignore them, never derive them from segment ids.
- Decoding starts from `module.init_cache(B, max_len)` called on the unbound module (so
  `init_cache` may only use dataclass fields) and passes `positions` only when the parallel
  run does too (mixers default to arange(T) + tokens already cached).

Nothing here registers a mixer. `ToyShiftMixer` is a small causal test double (a 3-tap
shift over a projection) that the helper tests and the model tests use.
"""

import contextlib
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.testing import RTOL, assert_rel_close

D_MODEL = 32
# A reset through a clamped log gate multiplies the state by exp(LOG_GATE_FLOOR) = e^-80
# ≈ 1.8e-35 instead of 0 (seqmix.ops._chunk), so gradients across a document boundary may be
# ~1e-35 × O(1) rather than exactly 0. Any real leak is many orders larger; 1e-20 relative to
# the within-document gradient separates the two with margin on both sides.
SEGMENT_LEAK_RTOL = 1e-20


def build(name: str, d_model: int = D_MODEL, **overrides) -> nn.Module:
  """The registered mixer `name` with its registry `test_kwargs` (updated by `overrides`)."""
  info = registry.get(name)
  if info.is_pattern:
    raise ValueError(f"{name!r} is a layer pattern, not a mixer; build one of {info.pattern}, "
                     f"or the whole pattern as one module with build_pattern({name!r}).")
  kwargs = {**info.test_kwargs, **overrides}
  return info.cls(d_model=d_model, **kwargs)


def build_pattern(name: str, d_model: int = D_MODEL, member_overrides=None,
                  max_run: int | None = None) -> "PatternStack":
  """The registered layer pattern `name` as one protocol module (`PatternStack`).

  Every member gets its registry `test_kwargs`, updated by `member_overrides[member]`
  (member name -> dict of field overrides) where given. max_run: keep at most this many
  layers of each run of one member (xlstm's 7 mLSTM + 1 sLSTM -> 2 + 1 with max_run=2), for
  checks whose cost grows with depth; None keeps the whole pattern.
  """
  info = registry.get(name)
  if not info.is_pattern:
    raise ValueError(f"{name!r} is a mixer, not a layer pattern; use build({name!r}).")
  member_overrides = member_overrides or {}
  unknown = set(member_overrides) - set(info.pattern)
  if unknown:
    raise ValueError(f"member_overrides names {sorted(unknown)}, which are not members of "
                     f"{name!r} {info.pattern}.")
  layers, run = [], 0
  for i, m in enumerate(info.pattern):
    run = run + 1 if i and info.pattern[i - 1] == m else 1
    if max_run is None or run <= max_run:
      layers.append(m)
  members = tuple(
      (m, tuple(sorted({**registry.get(m).test_kwargs, **member_overrides.get(m, {})}.items())))
      for m in layers)  # registry.get("shared:<mixer>") is <mixer>'s entry
  return PatternStack(d_model=d_model, members=members)


class PatternStack(MixerBase):
  """A layer pattern run as one mixer, so the protocol checks cover the members together.

  members: ((registry name, ((field, value), ...)), ...), one entry per layer (hashable, as
  Flax fields must be). Layer i sees the residual stream x_i (x_0 = x, x_{i+1} = x_i + y_i);
  the output is Σ y_i (= x_L − x_0, summed apart), without the identity, so an error in
  any member is not diluted by the input in the relative comparisons. No norms and no MLPs:
  those are the model's (tests/models covers the LanguageModel); this checks the members'
  caches, segment handling and positions when they are stacked.
  A member "shared:<mixer>" is one module (`shared_<mixer>`, the layer_idx of its first
  application) applied at every such layer, as the LanguageModel shares it; its kwargs are
  those of its first application.
  The cache is a tuple of member caches (one per layer, shared members included).
  """
  members: tuple = ()

  def _member(self, i, parent_free: bool):
    name, kwargs = self.members[i]
    if name != registry.base_name(name):
      i = [m for m, _ in self.members].index(name)
      kwargs = self.members[i][1]
    extra = ({"parent": None} if parent_free else
             {"name": f"layer_{i}" if name == registry.base_name(name)
              else f"shared_{registry.base_name(name)}"})
    return registry.get(name).cls(d_model=self.d_model, layer_idx=i, n_layers=len(self.members),
                                  dtype=self.dtype, param_dtype=self.param_dtype,
                                  **dict(kwargs), **extra)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    return tuple(self._member(i, True).init_cache(batch_size, max_len, dtype=dtype)
                 for i in range(len(self.members)))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (Σ_i y_i [B, T, D], tuple of member caches | None)."""
    if not self.members:
      raise ValueError("PatternStack needs members; build it with build_pattern(name).")
    h, out, new, shared = x, jnp.zeros_like(x), [], {}
    for i, (name, _) in enumerate(self.members):
      if name == registry.base_name(name):
        module = self._member(i, False)
      else:  # one module for every application of a shared member
        if name not in shared:
          shared[name] = self._member(i, False)
        module = shared[name]
      y, c = module(h, segment_ids=segment_ids, positions=positions,
                    cache=None if cache is None else cache[i], deterministic=deterministic)
      h, out = h + y.astype(h.dtype), out + y.astype(h.dtype)
      new.append(c)
    return out, (None if cache is None else tuple(new))


def _normal(seed: int, shape, dtype=jnp.float32):
  # Host-side numpy draws: an eager jax.random call compiles per shape, which would dominate
  # the runtime of these small checks.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def random_inputs(seed: int, batch: int, t: int, d: int = D_MODEL, dtype=jnp.float32):
  """x [B, T, D] ~ N(0, 1)."""
  return _normal(seed, (batch, t, d), dtype)


def init_params(module, x=None, seed: int = 0, zero_fill_std: float = 0.02):
  """Params of `module` (init on x, default [1, 4, d_model]) with all-zero leaves made random."""
  if x is None:
    x = random_inputs(seed + 1, 1, 4, module.d_model)
  params = jax.jit(module.init)(jax.random.key(seed), x)["params"]
  params = nn.meta.unbox(params)
  leaves, tree = jax.tree.flatten(params)
  out = []
  for i, leaf in enumerate(leaves):
    if jnp.issubdtype(leaf.dtype, jnp.inexact) and not np.any(np.asarray(leaf) != 0):
      leaf = (zero_fill_std * _normal(seed + 100 + i, leaf.shape)).astype(leaf.dtype)
    out.append(leaf)
  return jax.tree.unflatten(tree, out)


def oracle_setup(module, t: int = 11, b: int = 2, seed: int = 0, segment_ids=None):
  """Inputs, params and output of `module` for a float64 oracle to recompute.

  x = random_inputs [b, t, D], params = init_params (zero leaves made random), y = the jitted
  float32 forward. Returns (x float64, params as float64 numpy, y numpy, params as given).
  """
  x = random_inputs(seed, b, t, module.d_model)
  params = init_params(module, x, seed=seed)
  y, _ = jax.jit(module.apply)({"params": params}, x, segment_ids=segment_ids)
  params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  return np.asarray(x, np.float64), params64, np.asarray(y), params


def random_params(module, *inputs, seed: int = 0, std: float = 0.1):
  """Random params of `module`'s shapes without compiling its init (for checks that hold for
  any params): leaves named `scale` (norms) are 1 + N(0, std²), all others N(0, std²)."""
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"])
  rng = np.random.default_rng(seed)

  def fill(path, s):
    x = std * rng.standard_normal(s.shape).astype(np.float32)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      x = x + 1.0
    return jnp.asarray(x, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


class Runner:
  """Jitted apply of one (module, params): parallel forward, cached chunks, gradients."""

  def __init__(self, module, params):
    self.module, self.params = module, params

    def fwd(p, x, cache, segment_ids, positions):
      return module.apply({"params": p}, x, cache=cache, segment_ids=segment_ids,
                          positions=positions)

    self._fwd = jax.jit(fwd)

  def __call__(self, x, *, cache=None, segment_ids=None, positions=None, params=None):
    """x [B, T, D] -> (y [B, T, D], cache)."""
    return self._fwd(self.params if params is None else params, x, cache, segment_ids, positions)

  def init_cache(self, batch: int, max_len: int):
    return self.module.init_cache(batch, max_len)

  def decode(self, x, *, segment_ids=None, positions=None, chunks=None, max_len=None):
    """Run x [B, T, D] through the cache in chunks (default: one token at a time) -> y."""
    b, t, _ = x.shape
    chunks = chunks or [1] * t
    if sum(chunks) != t:
      raise ValueError(f"chunks {chunks} do not sum to T={t}.")
    cache = self.init_cache(b, max_len or t)
    ys, start = [], 0
    for n in chunks:
      sl = slice(start, start + n)
      y, cache = self(x[:, sl], cache=cache,
                      segment_ids=None if segment_ids is None else segment_ids[:, sl],
                      positions=None if positions is None else positions[:, sl])
      if cache is None:
        raise AssertionError(f"{type(self.module).__name__} returned cache=None when given a "
                             f"cache; it must return the updated cache.")
      ys.append(y)
      start += n
    return jnp.concatenate(ys, axis=1)


def _rtol(tol):
  return RTOL["float32"] if tol is None else tol


def check_causal(module, params, x=None):
  """∂y_t/∂x_s == 0 exactly for every s > t, and some ∂y_t/∂x_s != 0 for s < t (it mixes).

  One vjp per output position t (vmapped) with a random cotangent on y_t.
  """
  x = random_inputs(3, 2, 8, module.d_model) if x is None else x
  b, t, d = x.shape

  cot = np.random.default_rng(4).standard_normal((t, b, t, d), np.float32)
  cot *= np.eye(t, dtype=np.float32)[:, None, :, None]     # cotangent only on y_t [t, b, t, d]

  @jax.jit
  def input_grads(p, x_, c):
    _, vjp = jax.vjp(lambda z: module.apply({"params": p}, z)[0], x_)
    return jax.vmap(vjp)(c.astype(x_.dtype))[0]             # ∂<c_t, y_t>/∂x  [t, b, t, d]

  g = np.asarray(input_grads(params, x, cot))
  assert np.all(np.isfinite(g)), "non-finite input gradients"
  per_pair = np.abs(g).max(axis=(1, 3))                    # [t_out, s_in]
  future = np.triu(per_pair, k=1)
  bad = np.argwhere(future != 0)
  assert bad.size == 0, (f"not causal: ∂y_t/∂x_s != 0 for (t, s) in {bad[:5].tolist()} "
                         f"(max {future.max():.3e})")
  past = np.tril(per_pair, k=-1)
  assert past.max() > 0, "y_t does not depend on any earlier x_s: the module mixes no tokens"


def check_decode_matches_parallel(runner, x, *, rtol=None):
  """Token-by-token decoding through the cache equals the parallel forward."""
  y_par, _ = runner(x)
  assert_rel_close(runner.decode(x), y_par, _rtol(rtol), "decode vs parallel")


def check_split_prefill(runner, x, split: int, *, rtol=None):
  """A prefill of x[:, :split] then x[:, split:] from the returned cache equals the whole."""
  y_par, _ = runner(x)
  t = x.shape[1]
  y = runner.decode(x, chunks=[split, t - split])
  assert_rel_close(y, y_par, _rtol(rtol), f"prefill {split}+{t - split} vs parallel")


def packed_pair(x, first: int):
  """Segment ids and positions for x [B, T, D] packed as two documents [0, first), [first, T)."""
  b, t, _ = x.shape
  ar = jnp.arange(t, dtype=jnp.int32)
  seg = jnp.broadcast_to(jnp.where(ar < first, 1, 2).astype(jnp.int32), (b, t))
  pos = jnp.broadcast_to(jnp.where(ar < first, ar, ar - first).astype(jnp.int32), (b, t))
  return seg, pos


def check_segments(runner, x, first: int, *, rtol=None, decode=True):
  """Document 2 of a packed pair equals document 2 alone; no gradient reaches document 1.

  With `decode`, the packed pair decoded token by token gives the same document-2 outputs.
  """
  module, params = runner.module, runner.params
  b, t, _ = x.shape
  seg, pos = packed_pair(x, first)
  alone_pos = pos[:, first:]
  y_alone, _ = runner(x[:, first:], positions=alone_pos)
  y_packed, _ = runner(x, segment_ids=seg, positions=pos)
  assert_rel_close(y_packed[:, first:], y_alone, _rtol(rtol), "packed doc 2 vs alone")

  w = _normal(5, y_alone.shape)

  def doc2_loss(x_):
    y = module.apply({"params": params}, x_, segment_ids=seg, positions=pos)[0]
    return jnp.sum(y[:, first:].astype(jnp.float32) * w)

  g = np.asarray(jax.jit(jax.grad(doc2_loss))(x))
  assert np.all(np.isfinite(g)), "non-finite gradients with segment ids"
  leak, own = np.abs(g[:, :first]).max(), np.abs(g[:, first:]).max()
  assert own > 0, "document-2 outputs do not depend on document-2 inputs"
  assert leak <= SEGMENT_LEAK_RTOL * own, (
      f"gradient of document-2 outputs reaches document-1 inputs: max {leak:.3e} "
      f"(document 2: {own:.3e})")
  if decode:
    y_dec = runner.decode(x, segment_ids=seg, positions=pos)
    assert_rel_close(y_dec[:, first:], y_alone, _rtol(rtol), "decoded packed doc 2 vs alone")
    assert_rel_close(y_dec, y_packed, _rtol(rtol), "decoded packed vs parallel packed")


def check_finite_grads(module, params, x, *, unused=()):
  """A scalar loss has finite gradients w.r.t. params and inputs, none identically zero.

  Every parameter leaf must get a gradient with some nonzero entry: an identically zero one
  means the parameter does not reach the output (a dropped branch, a stop_gradient, a gate
  that multiplies by zero), which this check exists to catch.
  unused: keystr paths (e.g. "['w_out']['kernel']") of leaves that are legitimately unused
    for this input (the caller states why); they must have an all-zero gradient, so a stale
    entry fails too.
  """

  def loss(p, x_):
    y = module.apply({"params": p}, x_)[0].astype(jnp.float32)
    return jnp.mean(jnp.square(y)) + jnp.mean(jnp.sin(y))

  gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  paths = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(gp)[0]:
    leaf = np.asarray(leaf)
    paths[jax.tree_util.keystr(path)] = leaf
    assert np.all(np.isfinite(leaf)), f"non-finite grad at {jax.tree_util.keystr(path)}"
  assert np.all(np.isfinite(np.asarray(gx))), "non-finite input gradient"
  assert float(jnp.abs(gx).max()) > 0, "input gradient is identically zero"
  missing = sorted(set(unused) - set(paths))
  assert not missing, f"unused lists {missing}, which are not parameters of {sorted(paths)}"
  zero = sorted(k for k, g in paths.items() if not np.any(g != 0) and k not in unused)
  name = type(module).__name__
  assert not zero, (f"{name}: gradient identically zero for {', '.join(zero)}: these "
                    f"parameters do not reach the output (list them as unused, with the "
                    f"reason, only if that is intended)")
  used = sorted(k for k in unused if np.any(paths[k] != 0))
  assert not used, f"{name}: parameters listed as unused get a gradient: {', '.join(used)}"


class ToyCache(NamedTuple):
  inputs: jax.Array  # [B, L-1, D] the previous L-1 projected inputs, oldest first
  seg: jax.Array     # [B, L-1] int32 their segment ids (-1 before the first token)


class ToyShiftMixer(MixerBase):
  """Test double: y_t = W_o Σ_{s<L} k_s ⊙ (W_i x)_{t−s}, taps masked across documents.

  taps: L. leak_future / ignore_segments / dead_param (a parameter multiplied by zero):
  deliberate protocol violations, for testing that the checks above catch them. Not
  registered.
  """
  taps: int = 3
  leak_future: bool = False
  ignore_segments: bool = False
  dead_param: bool = False

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    del max_len
    return ToyCache(jnp.zeros((batch_size, self.taps - 1, self.d_model), dtype),
                    jnp.full((batch_size, self.taps - 1), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    del positions, deterministic
    b, t, d = x.shape
    l1 = self.taps - 1
    dense = functools.partial(nn.Dense, d, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    u = dense(name="w_in")(x)
    k = self.param("taps_kernel", nn.initializers.normal(0.5), (self.taps, d), self.param_dtype)
    seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None or self.ignore_segments
           else segment_ids.astype(jnp.int32))
    past = jnp.zeros((b, l1, d), u.dtype) if cache is None else cache.inputs.astype(u.dtype)
    past_seg = jnp.full((b, l1), -1, jnp.int32) if cache is None else cache.seg
    full = jnp.concatenate([past, u], axis=1)             # [b, l1 + t, d]
    full_seg = jnp.concatenate([past_seg, seg], axis=1)   # [b, l1 + t]
    y = jnp.zeros_like(u)
    for s in range(self.taps):
      same = (full_seg[:, l1 - s:l1 - s + t] == seg)[..., None]
      y = y + jnp.where(same, full[:, l1 - s:l1 - s + t] * k[s].astype(u.dtype), 0)
    if self.leak_future:
      y = y + 0.1 * jnp.concatenate([u[:, 1:], jnp.zeros_like(u[:, :1])], axis=1)
    if self.dead_param:
      y = y + 0.0 * self.param("dead", nn.initializers.normal(1.0), (d,), self.param_dtype)
    y = dense(name="w_out")(y)
    new_cache = None if cache is None else ToyCache(
        full[:, full.shape[1] - l1:].astype(cache.inputs.dtype), full_seg[:, full.shape[1] - l1:])
    return y, new_cache


@contextlib.contextmanager
def temporarily_registered(name: str, cls, **meta):
  """Register `cls` as `name` for the duration of a `with` block (tests of the model only)."""
  registry.names()  # load every real mixer first so removal restores exactly the old state
  if name in registry._REGISTRY:  # pylint: disable=protected-access
    raise ValueError(f"{name!r} is already registered.")
  meta = {"paper": "test double", "year": 2024, "venue": "tests", "family": "linear-rnn",
          "op": "none", **meta}
  registry.register(name, **meta)(cls)
  try:
    yield registry.get(name)
  finally:
    registry._REGISTRY.pop(name, None)  # pylint: disable=protected-access


__all__ = ["D_MODEL", "SEGMENT_LEAK_RTOL", "build", "random_inputs", "init_params",
           "random_params", "Runner", "build_pattern", "PatternStack",
           "check_causal", "check_decode_matches_parallel", "check_split_prefill",
           "packed_pair", "check_segments", "check_finite_grads", "ToyShiftMixer", "ToyCache",
           "temporarily_registered", "lag_copy_accuracy", "lag_copy_majority"]


def lag_copy_accuracy(mixer: str, *, mixer_kwargs=None, steps: int = 300, lr: float = 1e-2,
                      vocab_size: int = 16, seq_len: int = 32, batch_size: int = 32, lag: int = 2,
                      d_model: int = D_MODEL, n_layers: int = 2, seed: int = 0) -> float:
  """Train a small LanguageModel on the lag-k copy task with Adam; held-out accuracy.

  mixer: a registry name (its `test_kwargs` unless `mixer_kwargs` is given) or "none" (blocks
  without token mixing: the negative control, which must stay near chance 1/vocab_size).
  The whole training run is one jitted `lax.scan` over pre-generated batches.
  """
  import optax  # pylint: disable=g-import-not-at-top
  from seqmix.data import copying  # pylint: disable=g-import-not-at-top
  from seqmix.models import lm  # pylint: disable=g-import-not-at-top  (lm imports the registry)

  if mixer_kwargs is None:
    mixer_kwargs = {} if mixer == lm.NO_MIXER else {mixer: registry.get(mixer).test_kwargs}
  # A mixer with no position information of its own gets learned absolute positions, as
  # its paper's model does (registry `needs_positions`).
  learned = mixer != lm.NO_MIXER and registry.get(mixer).needs_positions
  model = lm.LanguageModel(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                           mixer=mixer, mixer_kwargs=mixer_kwargs, mlp="swiglu",
                           pos_embedding="learned" if learned else "none", max_len=seq_len)
  inputs, targets = copying.copy_arrays(seed, (steps, batch_size, seq_len),
                                        vocab_size=vocab_size, lag=lag)  # [steps, b, t]
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), inputs[0])["params"])
  opt = optax.adam(lr)

  def loss_fn(p, inp, tgt):
    logits = model.apply({"params": p}, inp)[0]
    mask = tgt != copying.IGNORE
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, tgt, 0))
    return jnp.sum(ce * mask) / jnp.sum(mask)

  @jax.jit
  def fit(params, inputs, targets):
    def one(carry, batch):
      p, s = carry
      g = jax.grad(loss_fn)(p, *batch)
      upd, s = opt.update(g, s, p)
      return (optax.apply_updates(p, upd), s), None
    return jax.lax.scan(one, (params, opt.init(params)), (inputs, targets))[0][0]

  params = fit(params, jnp.asarray(inputs), jnp.asarray(targets))
  test_in, test_tgt = copying.copy_arrays(seed + 1, (4 * batch_size, seq_len),
                                          vocab_size=vocab_size, lag=lag)
  logits = jax.jit(model.apply)({"params": params}, jnp.asarray(test_in))[0]
  return copying.copy_accuracy(logits, test_tgt)


def lag_copy_majority(mixer: str, threshold: float, *, seeds=(0, 1, 2), **kwargs):
  """Whether most of `seeds` reach `threshold` on lag_copy_accuracy -> (bool, {seed: acc}).

  One short run is noisy: the same seed lands at 0.80 or 1.00 with different XLA builds (gla
  with and without the 8-host-device flag), so a single seed makes the test a coin flip on
  the build. The majority of an odd number of seeds (the median's side of the threshold) is
  robust to one unlucky seed and still fails a mixer that does not learn. Seeds run in order
  and stop as soon as the majority is decided (two of three on one side).
  """
  need = len(seeds) // 2 + 1
  accs = {}
  for s in seeds:
    accs[s] = lag_copy_accuracy(mixer, seed=s, **kwargs)
    hits = sum(a >= threshold for a in accs.values())
    if hits >= need or len(accs) - hits >= need:
      break
  return sum(a >= threshold for a in accs.values()) >= need, accs
