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
def test_matches_formula(kind):
  """Row 0 packs two documents (positions restarting), row 1 is one. Unpacked inputs without
  segment ids, and decoding, are the protocol suite's (doc 2 alone == packed, decode ==
  parallel); positions past max_len give NaN, not a clipped table entry."""
  cls = DenseSynthesizer if kind == "dense" else RandomSynthesizer
  module = cls(d_model=D, num_heads=H, max_len=L)
  x, p64, _, params = mt.oracle_setup(module, t=T, b=2)
  if kind == "random":   # logits of order 1, so the softmax is far from uniform
    r = np.random.default_rng(3).standard_normal(params["random_logits"].shape)
    params["random_logits"] = jnp.asarray(r, jnp.float32)
    p64["random_logits"] = np.asarray(params["random_logits"], np.float64)
  runner = mt.Runner(module, params)
  xs = jnp.asarray(x, jnp.float32)
  y, _ = runner(xs, segment_ids=jnp.asarray(SEG), positions=jnp.asarray(POS))
  assert_rel_close(y, _loop(x, p64, kind, SEG, POS), RTOL["float32"], f"{kind} vs loop")
  past = np.broadcast_to(np.arange(T) + L - 5, (2, T))      # tokens 5.. sit at positions >= L
  y = np.asarray(runner(xs, segment_ids=jnp.zeros((2, T), jnp.int32),
                        positions=jnp.asarray(past))[0])
  assert np.all(np.isfinite(y[:, :5])) and np.all(np.isnan(y[:, 5:]))


@pytest.mark.parametrize("cls", [DenseSynthesizer, RandomSynthesizer])
def test_config_errors(cls):
  x = mt.random_inputs(0, 1, 9)
  with pytest.raises(ValueError, match=r"sequence length T=9 .* max_len=8"):
    cls(d_model=D, max_len=8).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"init_cache max_len=9 .* max_len=8"):
    cls(d_model=D, max_len=8).init_cache(1, 9)
  with pytest.raises(ValueError, match=r"d_model=32 must be divisible by num_heads=5"):
    cls(d_model=D, num_heads=5).init_cache(1, 4)
