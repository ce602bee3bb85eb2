"""MHA-specific tests: decoding (token by token, split prefill, ring buffer) equals the parallel
form across position encodings and head layouts; config errors; logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix import registry
from seqmix.mixers.attention.mha import MHA
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
