"""Dense and Random Synthesizer against a float64 NumPy loop of the paper's equations, with
packed documents (positions restarting), decoding, and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.mlp_mixer.synthesizer import DenseSynthesizer, RandomSynthesizer
from seqmix.testing import RTOL, assert_rel_close

D, T, H, L = 32, 11, 4, 16
SEG = np.array([[1] * 4 + [2] * 7, [0] * T], np.int32)
POS = np.array([list(range(4)) + list(range(7)), list(range(T))], np.int32)


def _loop(x, p, kind, seg, pos):
  """o_t[h] = Σ_{s≤t, same doc} softmax_s(logit[h, t, s]) v_s[h], y = o W_o."""
  b, t, _ = x.shape
  v = np.einsum("btd,dhk->bthk", x, p["v_proj"]["kernel"])
  if kind == "dense":
    z = np.maximum(x @ p["w1"]["kernel"] + p["w1"]["bias"], 0.0)
    rows = np.einsum("btm,mhl->bthl", z, p["w2"]["kernel"]) + p["w2"]["bias"]   # [b,t,h,L]
  o = np.zeros(v.shape)
  for i in range(b):
    for s in range(t):
      for hh in range(H):
        keys = [r for r in range(s + 1) if seg[i, r] == seg[i, s]]
        if kind == "dense":
          lg = np.array([rows[i, s, hh, pos[i, r]] for r in keys])
        else:
          lg = np.array([p["random_logits"][hh, pos[i, s], pos[i, r]] for r in keys])
        e = np.exp(lg - lg.max())
        o[i, s, hh] = (e[:, None] * v[i, keys, hh]).sum(0) / e.sum()
  return np.einsum("bthk,hkd->btd", o, p["o_proj"]["kernel"])


@pytest.mark.parametrize("kind", ["dense", "random"])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_formula(kind, packed):
  cls = DenseSynthesizer if kind == "dense" else RandomSynthesizer
  module = cls(d_model=D, num_heads=H, max_len=L)
  x, p64, _, params = mt.oracle_setup(module, t=T, b=2)
  if kind == "random":   # logits of order 1, so the softmax is far from uniform
    r = np.random.default_rng(3).standard_normal(params["random_logits"].shape)
    params["random_logits"] = jnp.asarray(r, jnp.float32)
    p64["random_logits"] = np.asarray(params["random_logits"], np.float64)
  seg = SEG if packed else np.zeros_like(SEG)
  pos = POS if packed else np.broadcast_to(np.arange(T), SEG.shape)
  kw = dict(segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos)) if packed else {}
  runner = mt.Runner(module, params)
  xs = jnp.asarray(x, jnp.float32)
  want = _loop(x, p64, kind, seg, pos)
  assert_rel_close(runner(xs, **kw)[0], want, RTOL["float32"], f"{kind} parallel vs loop")
  assert_rel_close(runner.decode(xs, **kw, max_len=L), want, RTOL["float32"],
                   f"{kind} decode vs loop")


@pytest.mark.parametrize("cls", [DenseSynthesizer, RandomSynthesizer])
def test_config_errors(cls):
  x = mt.random_inputs(0, 1, 9)
  with pytest.raises(ValueError, match=r"sequence length T=9 .* max_len=8"):
    cls(d_model=D, max_len=8).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"init_cache max_len=9 .* max_len=8"):
    cls(d_model=D, max_len=8).init_cache(1, 9)
  with pytest.raises(ValueError, match=r"d_model=32 must be divisible by num_heads=5"):
    cls(d_model=D, num_heads=5).init_cache(1, 4)


@pytest.mark.parametrize("cls", [DenseSynthesizer, RandomSynthesizer])
def test_positions_past_max_len_are_nan(cls):
  module = cls(d_model=D, max_len=8)
  x = mt.random_inputs(0, 1, 4)
  params = mt.init_params(module, x)
  y, _ = module.apply({"params": params}, x, positions=jnp.asarray([[5, 6, 7, 8]]))
  y = np.asarray(y)
  assert np.all(np.isfinite(y[:, :3])) and np.all(np.isnan(y[:, 3]))
