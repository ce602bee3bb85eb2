"""Every registered positional component inside `mha`: decoding token by token (and a split
prefill) through the KV cache equals the parallel forward at positions far past any training
length (T = 40 starting at position 1000), with grouped kv heads; causality and segment
isolation through the shared protocol checks (seqmix.mixers.testing). A sample runs in the
default suite; every component runs under `-m slow`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.mha import MHA
from seqmix.positional import base
from seqmix.testing import RTOL, assert_rel_close

NAMES = [n for n in base.names() if not base.get(n).builtin]


def _cases(default):
  return [pytest.param(n, marks=() if n in default else pytest.mark.slow) for n in NAMES]


# One of each kind in the default suite: a learned bias, a rotation, a content bias.
DECODE_SAMPLE = ("t5", "xpos", "cope")
PROTOCOL_SAMPLE = ("cope",)
T, OFFSET, FIRST = 40, 1000, 21


def _setup(name, **kw):
  mod = MHA(d_model=mt.D_MODEL, num_heads=4, num_kv_heads=2, position=name, **kw)
  params = mt.init_params(mod)
  return mod, params, mt.Runner(mod, params)


@pytest.mark.parametrize("name", _cases(DECODE_SAMPLE))
def test_decode_matches_parallel_past_training_length(name):
  _, _, run = _setup(name)
  x = mt.random_inputs(0, 2, T)
  pos = OFFSET + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
  y, _ = run(x, positions=pos)
  assert_rel_close(run.decode(x, positions=pos), y, RTOL["float32"], f"{name}: token by token")


@pytest.mark.parametrize("name", _cases(PROTOCOL_SAMPLE))
def test_causal_and_segments_isolated(name):
  """The shared checks: ∂y_t/∂x_s = 0 for s > t; a packed second document (positions restart)
  equals it alone, in parallel and decoded, and gets no gradient from the first."""
  mod, params, run = _setup(name)
  mt.check_causal(mod, params)
  mt.check_segments(run, mt.random_inputs(0, 2, T), FIRST)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_split_prefill_and_window_ring_buffer(name):
  """A prefill split 27 + 13; and a window of 6 keys, where the cache is a ring of 6 slots,
  out of token order once it wraps."""
  _, _, run = _setup(name)
  x = mt.random_inputs(1, 2, T)
  pos = OFFSET + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
  y, _ = run(x, positions=pos)
  assert_rel_close(run.decode(x, positions=pos, chunks=[27, 13]), y, RTOL["float32"],
                   f"{name}: split prefill")
  _, _, run = _setup(name, window=6)
  y, _ = run(x[:, :20], positions=pos[:, :20])
  assert_rel_close(run.decode(x[:, :20], positions=pos[:, :20]), y, RTOL["float32"],
                   f"{name}: ring decode")


def test_mha_with_kerple_equals_biased_attention_formula():
  """The wiring, against float64 numpy: mha adds the component's bias once, per query head
  (GQA: head i reads kv head i // 2), at the caller's positions (restarting per document),
  with a window; the KERPLE values come from the formula, not the component."""
  mod = MHA(d_model=mt.D_MODEL, num_heads=4, num_kv_heads=2, position="kerple_log", window=5)
  x = mt.random_inputs(0, 2, 12)
  params = mt.init_params(mod, x)
  seg = np.array([[1] * 5 + [2] * 7, [1] * 12])
  pos = np.array([list(range(5)) + list(range(7)), list(range(100, 112))])
  y, _ = mt.Runner(mod, params)(x, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x64 = np.asarray(x, np.float64)
  q, k, v = (np.einsum("btd,dhk->bthk", x64, p[n]["kernel"]) for n in ("q_proj", "k_proj",
                                                                          "v_proj"))
  r1 = np.maximum(p["positional"]["r1"], 1e-2)
  r2 = np.maximum(p["positional"]["r2"], 1e-2)
  o = np.zeros(q.shape)
  for b in range(2):
    for h in range(4):
      for t in range(12):
        keys = [s for s in range(t + 1) if seg[b, s] == seg[b, t] and s > t - 5]
        lg = np.array([q[b, t, h] @ k[b, s, h // 2] / np.sqrt(8)
                       - r1[h] * np.log(1 + r2[h] * (pos[b, t] - pos[b, s])) for s in keys])
        w = np.exp(lg - lg.max())
        o[b, t, h] = (w / w.sum()) @ v[b, keys, h // 2]
  want = np.einsum("bthk,hkd->btd", o, p["o_proj"]["kernel"])
  assert_rel_close(y, want, RTOL["float32"], "mha(kerple_log) vs formula")
