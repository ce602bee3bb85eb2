"""AFT-full and AFT-simple against a float64 NumPy loop of the paper's equation, packed
documents, stability for large keys, and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.mlp_mixer.aft import AFTFull, AFTLocal, AFTSimple
from seqmix.testing import RTOL, assert_rel_close

D, T = 32, 11
# Row 0: two documents [0, 4) and [4, 11), positions restarting; row 1: one document.
SEG = np.array([[1] * 4 + [2] * 7, [0] * T], np.int32)
POS = np.array([list(range(4)) + list(range(7)), list(range(T))], np.int32)


def _loop(x, p, w=None, seg=SEG, pos=POS, local=None):
  """y_t = σ(q_t) ⊙ Σ_{t'≤t, same doc} e^{k_t' + w[pos_t, pos_t']} v_t' / Σ(...) , then W_o;
  with `local`, w[pos_t, pos_t'] counts only where pos_t − pos_t' < local (AFT-local)."""
  q, k, v = (x @ p[n]["kernel"] for n in ("query", "key", "value"))
  b, t, a = k.shape
  y = np.zeros((b, t, a))
  for i in range(b):
    for s in range(t):
      logits = np.full((t, a), -np.inf)
      for r in range(s + 1):
        if seg[i, r] == seg[i, s]:
          near = local is None or pos[i, s] - pos[i, r] < local
          logits[r] = k[i, r] + (0.0 if w is None or not near else w[pos[i, s], pos[i, r]])
      e = np.exp(logits - logits.max(axis=0))
      y[i, s] = (e * v[i]).sum(0) / e.sum(0)
  return (1.0 / (1.0 + np.exp(-q)) * y) @ p["output"]["kernel"]


def _setup(module, scale_key=1.0):
  x, p64, _, params = mt.oracle_setup(module, t=T, b=2)
  params = jax.tree.map(lambda a: a, params)
  params["key"]["kernel"] = params["key"]["kernel"] * scale_key
  p64["key"]["kernel"] = p64["key"]["kernel"] * scale_key
  if "pos_bias" in params:   # a strong, asymmetric pairwise bias, so a wrong index shows
    wb = np.random.default_rng(7).standard_normal(params["pos_bias"].shape)
    params["pos_bias"] = jnp.asarray(wb, jnp.float32)
    p64["pos_bias"] = np.asarray(params["pos_bias"], np.float64)
  return x, p64, params


@pytest.mark.parametrize("local", [None, 3])
def test_aft_full_matches_formula(local):
  """Row 0 packs two documents (positions restarting), row 1 is one. Unpacked inputs without
  segment ids, and decoding, are the protocol suite's (doc 2 alone == packed, decode ==
  parallel); positions past max_len give NaN (inside jit a traced position cannot raise),
  not a clipped bias."""
  module = AFTFull(d_model=D, max_len=16) if local is None else AFTLocal(d_model=D, max_len=16,
                                                                          window=local)
  x, p64, params = _setup(module)
  runner = mt.Runner(module, params)
  xs = jnp.asarray(x, jnp.float32)
  y, _ = runner(xs, segment_ids=jnp.asarray(SEG), positions=jnp.asarray(POS))
  assert_rel_close(y, _loop(x, p64, p64["pos_bias"], local=local), RTOL["float32"],
                   "aft vs loop")
  past = np.broadcast_to(np.arange(T) + 16 - 5, (2, T))     # tokens 5.. sit at positions >= 16
  y = np.asarray(runner(xs, segment_ids=jnp.zeros((2, T), jnp.int32),
                        positions=jnp.asarray(past))[0])
  assert np.all(np.isfinite(y[:, :5])) and np.all(np.isnan(y[:, 5:]))


@pytest.mark.parametrize("packed", [False, True])
def test_aft_simple_matches_formula(packed):
  module = AFTSimple(d_model=D)
  x, p64, params = _setup(module)
  seg = SEG if packed else np.zeros_like(SEG)
  kw = dict(segment_ids=jnp.asarray(seg)) if packed else {}
  runner = mt.Runner(module, params)
  y, _ = runner(jnp.asarray(x, jnp.float32), **kw)
  assert_rel_close(y, _loop(x, p64, None, seg), RTOL["float32"], "aft_simple parallel vs loop")


def test_aft_simple_is_stable_for_large_keys():
  """Keys of magnitude ~300 overflow a plain exp in float32 (e^89 = inf); the running
  log-sum-exp state (decode) and the WKV / attention forms (parallel) must not."""
  module = AFTSimple(d_model=D)
  x, p64, params = _setup(module, scale_key=60.0)
  k = x @ p64["key"]["kernel"]
  assert np.abs(k).max() > 150
  runner = mt.Runner(module, params)
  want = _loop(x, p64, None, np.zeros_like(SEG))
  xs = jnp.asarray(x, jnp.float32)
  # The softmax over keys this far apart is nearly one-hot: float32 rounding of k (~300,
  # ulp ~3e-5) moves the weights by up to e^{3e-5·…}; 1e-4 bounds what we saw with margin.
  assert_rel_close(runner(xs)[0], want, 1e-4, "parallel, large k")
  assert_rel_close(runner.decode(xs), want, 1e-4, "decode, large k")
  y_seg, _ = runner(xs, segment_ids=jnp.zeros((2, T), jnp.int32))
  assert_rel_close(y_seg, want, 1e-4, "attention path, large k")


def test_aft_full_config_errors():
  module = AFTFull(d_model=D, max_len=8)
  x = mt.random_inputs(0, 1, 9)
  with pytest.raises(ValueError, match=r"sequence length T=9 .* max_len=8"):
    module.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"init_cache max_len=9 .* max_len=8"):
    module.init_cache(1, 9)
  with pytest.raises(ValueError, match=r"hidden_dim=-1"):
    AFTFull(d_model=D, hidden_dim=-1).init_cache(1, 4)
  with pytest.raises(ValueError, match=r"window=0 must be >= 1"):
    AFTLocal(d_model=D, max_len=8, window=0).init(jax.random.key(0), x[:, :4])
