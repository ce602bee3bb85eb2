"""MHA-specific tests: the output against a float64 numpy formula (MHA, GQA, MQA, RoPE, ALiBi,
windows, QK-norm, packed documents; Griffin's `local_mqa`), decoding (token by token, split
prefill, ring buffer) equals the parallel form across position encodings and head layouts; config
errors; logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import registry
from seqmix.mixers import testing as mt
from seqmix.mixers.attention.mha import MHA
from seqmix.mixers.rnn.griffin import LocalMQA
from seqmix.testing import RTOL, assert_rel_close

D = 32
T = 13


def _x(b=2, t=T, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, D)), dtype)


# Two packed documents in row 0 (positions restart at the boundary), one in row 1.
SEG = jnp.asarray([[0] * 5 + [1] * 8, [0] * 13], jnp.int32)
POS = jnp.asarray([list(range(5)) + list(range(8)), list(range(13))], jnp.int32)

CONFIGS = {
    "rope_gqa": dict(num_heads=4, num_kv_heads=2),
    "alibi_window": dict(num_heads=4, position="alibi", window=4),
    "mqa_qknorm_window_partial_rope": dict(num_heads=4, num_kv_heads=1, qk_norm=True, window=3,
                                          rope_fraction=0.5, use_bias=True),
    "nope_headdim_chunked": dict(num_heads=2, head_dim=12, position="none", impl="chunked"),
}


def _setup(kw, dtype=jnp.float32):
  mod = MHA(d_model=D, dtype=dtype, **kw)
  x = _x(dtype=dtype)
  params = mod.init(jax.random.PRNGKey(0), x)
  return mod, params, x


@pytest.mark.parametrize("name,packed", [
    ("rope_gqa", False), ("rope_gqa", True), ("alibi_window", True),
    ("mqa_qknorm_window_partial_rope", True), ("nope_headdim_chunked", False)])
def test_decode_matches_parallel(name, packed):
  """T single-token steps, and a prefill split in two uneven chunks (the second longer than
  any window, so the ring buffer wraps inside one call), equal the parallel form."""
  mod, params, x = _setup(CONFIGS[name])
  seg, pos = (SEG, POS) if packed else (None, None)
  y, none = jax.jit(lambda p, x: mod.apply(p, x, segment_ids=seg, positions=pos))(params, x)
  assert none is None
  step = jax.jit(lambda p, x, s, q, c: mod.apply(p, x, segment_ids=s, positions=q, cache=c))
  cache = mod.init_cache(2, 20)
  ys = []
  for i in range(T):
    sl = slice(i, i + 1)
    yi, cache = step(params, x[:, sl], None if seg is None else seg[:, sl],
                     None if pos is None else pos[:, sl], cache)
    ys.append(yi)
  assert_rel_close(jnp.concatenate(ys, axis=1), y, 1e-5, f"{name}: token by token")
  np.testing.assert_array_equal(cache.length, [T, T])

  cache = mod.init_cache(2, 20)
  parts = []
  for sl in (slice(0, 4), slice(4, T)):
    yi, cache = step(params, x[:, sl], None if seg is None else seg[:, sl],
                     None if pos is None else pos[:, sl], cache)
    parts.append(yi)
  assert_rel_close(jnp.concatenate(parts, axis=1), y, 1e-5, f"{name}: split prefill")


# The output against the formula, recomputed in float64 numpy from the module's parameters
# (nothing from seqmix.ops or seqmix.positional): the oracle of every attention mixer.


def _rms_norm64(a, scale, eps=1e-6):
  return a / np.sqrt(np.mean(a * a, -1, keepdims=True) + eps) * scale


def _rope64(a, pos, base, fraction):
  """Rotate-half RoPE on the first R = 2·floor(fraction·Dh/2) channels.  a [B,T,H,Dh], pos [B,T]."""
  r = 2 * int(fraction * a.shape[-1] // 2)
  theta = base ** (-np.arange(0, r, 2) / r)                        # [r/2]
  ang = pos[:, :, None, None] * theta                              # [b, t, 1, r/2]
  a1, a2, rest = a[..., :r // 2], a[..., r // 2:r], a[..., r:]
  return np.concatenate([a1 * np.cos(ang) - a2 * np.sin(ang),
                         a2 * np.cos(ang) + a1 * np.sin(ang), rest], -1)


def attention_oracle(x, p, *, num_heads, num_kv_heads, position="rope", rope_base=10000.0,
                     rope_fraction=1.0, window=None, qk_norm=False, seg=None, pos=None):
  """Causal softmax attention layer in float64.  x [B,T,D], p: the MHA params -> y [B,T,D].

  Query head i reads kv head i // (H/G); token t sees tokens s <= t (s > t − W with a window)
  of its own segment; ALiBi adds −m_i (pos_t − pos_s) with the paper's slopes (H a power of
  two: m_i = 2^(−8(i+1)/H)).
  """
  b, t, _ = x.shape
  h, g = num_heads, num_kv_heads
  pos = np.broadcast_to(np.arange(t), (b, t)) if pos is None else np.asarray(pos)
  seg = np.zeros((b, t), np.int64) if seg is None else np.asarray(seg)

  def proj(name):
    y = np.einsum("btd,dhk->bthk", x, p[name]["kernel"])
    return y + p[name]["bias"] if "bias" in p[name] else y

  q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")         # [b, t, h|g, dh]
  dh = q.shape[-1]
  if qk_norm:
    q, k = _rms_norm64(q, p["q_norm"]["scale"]), _rms_norm64(k, p["k_norm"]["scale"])
  if position == "rope":
    q, k = _rope64(q, pos, rope_base, rope_fraction), _rope64(k, pos, rope_base, rope_fraction)
  o = np.zeros(q.shape)
  for bi in range(b):
    for i in range(h):
      kv = i // (h // g)
      for tq in range(t):
        keys = [s for s in range(tq + 1) if seg[bi, s] == seg[bi, tq]
                and (window is None or s > tq - window)]
        logits = np.array([q[bi, tq, i] @ k[bi, s, kv] / np.sqrt(dh) for s in keys])
        if position == "alibi":
          logits -= 2.0 ** (-8.0 * (i + 1) / h) * np.array([pos[bi, tq] - pos[bi, s]
                                                            for s in keys])
        w = np.exp(logits - logits.max())
        o[bi, tq, i] = (w / w.sum()) @ v[bi, keys, kv]
  y = np.einsum("bthk,hkd->btd", o, p["o_proj"]["kernel"])
  return y + p["o_proj"]["bias"] if "bias" in p["o_proj"] else y


def _oracle_inputs(mod, t=20, jitter_scales=True):
  """x [2, t, D] and params (init, zero leaves random; norm scales 1 + N(0, 0.1²) so a scale the
  module ignored would show) -> (x float32, params, float64 copies of both)."""
  x = mt.random_inputs(0, 2, t, D)
  params = mt.init_params(mod, x)
  if jitter_scales:
    rng = np.random.default_rng(7)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']") else a, params)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  return x, params, np.asarray(x, np.float64), p64


# Two documents in row 0 (positions restart at 7), one in row 1.
SEG20 = np.asarray([[1] * 7 + [2] * 13, [1] * 20])
POS20 = np.asarray([list(range(7)) + list(range(13)), list(range(20))])

ORACLE_CONFIGS = {
    "mha_rope": dict(num_heads=4),
    "gqa_rope_packed": dict(num_heads=4, num_kv_heads=2),
    "mqa_window_qknorm_partial_rope_bias": dict(num_heads=4, num_kv_heads=1, window=5,
                                                qk_norm=True, rope_fraction=0.5, use_bias=True,
                                                rope_base=100.0),
    "alibi_window_packed": dict(num_heads=4, position="alibi", window=4),
    "nope_head_dim_chunked": dict(num_heads=2, head_dim=12, position="none", impl="chunked"),
}


@pytest.mark.parametrize("name", list(ORACLE_CONFIGS))
def test_mha_equals_softmax_attention_formula(name):
  kw = ORACLE_CONFIGS[name]
  mod = MHA(d_model=D, **kw)
  x, params, x64, p64 = _oracle_inputs(mod)
  packed = name.endswith("_packed")
  seg, pos = (SEG20, POS20) if packed else (None, None)
  y, _ = jax.jit(lambda p_, x_: mod.apply({"params": p_}, x_, segment_ids=seg, positions=pos))(
      params, x)
  want = attention_oracle(x64, p64, num_heads=kw["num_heads"],
                          num_kv_heads=kw.get("num_kv_heads") or kw["num_heads"],
                          position=kw.get("position", "rope"),
                          rope_base=kw.get("rope_base", 10000.0),
                          rope_fraction=kw.get("rope_fraction", 1.0), window=kw.get("window"),
                          qk_norm=kw.get("qk_norm", False), seg=seg, pos=pos)
  assert_rel_close(y, want, RTOL["float32"], f"{name} vs formula")


def test_local_mqa_equals_griffin_local_attention_formula():
  """Griffin's block: one kv head, a window of W keys, RoPE (base 10000) on the first half of
  each head's channels; T = 20 spans five windows of 4."""
  mod = LocalMQA(d_model=D, num_heads=4, window=4)
  x, params, x64, p64 = _oracle_inputs(mod, jitter_scales=False)
  y, _ = jax.jit(lambda p_, x_: mod.apply({"params": p_}, x_))(params, x)
  want = attention_oracle(x64, p64, num_heads=4, num_kv_heads=1, rope_fraction=0.5, window=4)
  assert_rel_close(y, want, RTOL["float32"], "local_mqa vs formula")
  assert p64["k_proj"]["kernel"].shape == (D, 1, D // 4)


def test_window_cache_is_a_ring_of_window_slots():
  mod, params, x = _setup(CONFIGS["alibi_window"])
  cache = mod.init_cache(2, 100)
  assert cache.k.shape == (2, 4, 4, D // 4)
  _, cache = jax.jit(lambda p, x, c: mod.apply(p, x, cache=c))(params, x, cache)
  # Tokens 9..12 are held, token n in slot n mod 4.
  np.testing.assert_array_equal(cache.idx[0], [12, 9, 10, 11])


def test_decode_matches_parallel_bfloat16():
  mod, params, x = _setup(CONFIGS["rope_gqa"], dtype=jnp.bfloat16)
  y, _ = jax.jit(mod.apply)(params, x)
  step = jax.jit(lambda p, x, c: mod.apply(p, x, cache=c))
  cache = mod.init_cache(2, T, dtype=jnp.bfloat16)
  ys = []
  for i in range(T):
    yi, cache = step(params, x[:, i:i + 1], cache)
    ys.append(yi)
  assert y.dtype == jnp.bfloat16
  assert_rel_close(jnp.concatenate(ys, axis=1).astype(jnp.float32), y.astype(jnp.float32),
                   RTOL["bfloat16"], "bf16 decode")


def test_segments_isolate_documents():
  mod, params, x = _setup(CONFIGS["rope_gqa"])
  run = jax.jit(lambda x: mod.apply(params, x, segment_ids=SEG, positions=POS)[0])
  y = run(x)
  y2 = run(x.at[0, :5].set(-x[0, :5]))        # change the first document of row 0 only
  np.testing.assert_array_equal(y2[0, 5:], y[0, 5:])
  np.testing.assert_array_equal(y2[1], y[1])
  assert not np.allclose(y2[0, :5], y[0, :5])


def test_bad_configs_say_what_to_change():
  x = _x()
  with pytest.raises(ValueError, match=r"d_model=30 must be divisible by num_heads=4.*num_heads="):
    MHA(d_model=30, num_heads=4).init(jax.random.PRNGKey(0), x[..., :30])
  with pytest.raises(ValueError,
                     match=r"num_heads=4 must be divisible by num_kv_heads=3.*num_kv_heads="):
    MHA(d_model=D, num_heads=4, num_kv_heads=3).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="position='learned'"):
    MHA(d_model=D, position="learned").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="window=0"):
    MHA(d_model=D, window=0).init_cache(1, 8)
  # head_dim given explicitly: d_model need not be divisible.
  MHA(d_model=30, num_heads=4, head_dim=8).init(jax.random.PRNGKey(0), x[..., :30])


def test_cudnn_on_cpu_is_a_clear_error():
  with pytest.raises(RuntimeError, match="needs a GPU"):
    MHA(d_model=D, impl="cudnn").init(jax.random.PRNGKey(0), _x().astype(jnp.bfloat16))


def test_dropout_only_when_not_deterministic():
  mod, params, x = _setup(dict(num_heads=4, dropout=0.5))
  run = jax.jit(lambda x, det, key: mod.apply(params, x, deterministic=det,
                                               rngs={"dropout": key})[0], static_argnums=1)
  y = jax.jit(lambda x: mod.apply(params, x)[0])(x)
  y_det = run(x, True, jax.random.PRNGKey(1))
  y_drop = run(x, False, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(y, y_det)
  assert not np.allclose(y_drop, y)


def test_registry_entry_and_logical_axes():
  info = registry.get("mha")
  assert info.cls is MHA and not info.constant_state and info.family == "attention"
  mod = MHA(d_model=D, **info.test_kwargs)
  boxed = mod.init(jax.random.PRNGKey(0), _x())["params"]
  assert boxed["q_proj"]["kernel"].names == ("embed", "heads", "kv")
  assert boxed["k_proj"]["kernel"].value.shape == (D, 2, 8)
  assert boxed["o_proj"]["kernel"].names == ("heads", "kv", "embed")
