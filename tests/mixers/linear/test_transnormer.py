"""TransNormer: both token mixers against direct float64 formulas, and the protocol checks.

The shared protocol tests (tests/mixers/test_protocol.py) run the registry's test_kwargs, which
select DiagAttention (block_size 16). Here: DiagAttention with blocks of 4 (so T = 13 crosses
three block boundaries, inside prefill chunks and across them) and NormAttention, each
against a dense T×T formula from its own parameters and through the same protocol checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.linear import transnormer
from seqmix.testing import RTOL, assert_rel_close

D, H = mt.D_MODEL, 2
TOL = RTOL["float32"]  # float32 mixer vs float64 oracle from the same parameters


def _diag(block_size=4):
  return transnormer.TransNormer(d_model=D, num_heads=H, block_size=block_size, layer_idx=0,
                                 n_layers=2)


def _norm():
  return transnormer.TransNormer(d_model=D, num_heads=H, layer_idx=1, n_layers=2)


def _dense(x, p):
  return x @ p["kernel"] + p["bias"]


def _heads(x, p):
  b, t, _ = x.shape
  return _dense(x, p).reshape(b, t, H, D // H)              # [b, t, h, d/h]


def _diag_oracle(x, p, block_size, pos, seg):
  """Softmax over keys s <= t with the same block (pos // block_size) and document."""
  q, k, v = (_heads(x, p[n]) for n in ("q_proj", "k_proj", "v_proj"))
  b, t = x.shape[:2]
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D // H)
  blk = pos // block_size
  ok = ((np.arange(t)[:, None] >= np.arange(t)[None, :])[None]
        & (blk[:, :, None] == blk[:, None, :]) & (seg[:, :, None] == seg[:, None, :]))
  logits = np.where(ok[:, None], logits, -np.inf)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = np.einsum("bhts,bshd->bthd", a, v).reshape(b, t, D)
  return _dense(o, p["o_proj"])


def _phi(x):
  return np.where(x > 0, x + 1.0, np.exp(x))                 # elu(x) + 1


def test_diag_attention_matches_dense_formula():
  m = _diag()
  x, p, y, _ = mt.oracle_setup(m, t=13)
  b, t = x.shape[:2]
  pos = np.broadcast_to(np.arange(t), (b, t))
  assert_rel_close(y, _diag_oracle(x, p, 4, pos, np.zeros((b, t))), TOL)


def test_diag_attention_blocks_follow_positions_and_documents():
  """Packed documents with positions restarting at 0: blocks restart with each document."""
  m = _diag()
  x = mt.random_inputs(0, 2, 13)
  seg, pos = mt.packed_pair(x, 6)
  params = mt.init_params(m, x)
  y, _ = jax.jit(m.apply)({"params": params}, x, segment_ids=seg, positions=pos)
  p = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in params.items()}
  want = _diag_oracle(np.asarray(x, np.float64), p, 4, np.asarray(pos), np.asarray(seg))
  assert_rel_close(y, want, TOL)


def test_diag_attention_is_local_to_its_block():
  """Output at t does not depend on tokens of earlier blocks (exactly)."""
  m = _diag()
  x = mt.random_inputs(1, 1, 12)
  params = mt.init_params(m, x)
  apply = jax.jit(m.apply)
  y0, _ = apply({"params": params}, x)
  y1, _ = apply({"params": params}, x.at[:, :8].add(1.0))  # change blocks 0 and 1
  np.testing.assert_array_equal(np.asarray(y0[:, 8:]), np.asarray(y1[:, 8:]))
  assert not np.allclose(np.asarray(y0[:, :8]), np.asarray(y1[:, :8]))


def test_norm_attention_matches_dense_formula():
  m = _norm()
  x, p, y, _ = mt.oracle_setup(m, t=13)
  b, t = x.shape[:2]
  q, k, v = (_heads(x, p[n]) for n in ("q_proj", "k_proj", "v_proj"))
  kern = np.einsum("bthd,bshd->bhts", _phi(q), _phi(k)) * np.tril(np.ones((t, t)))
  o = np.einsum("bhts,bshd->bthd", kern, v).reshape(b, t, D)  # no scale, no denominator
  o = o / np.sqrt(np.mean(o ** 2, -1, keepdims=True) + m.norm_eps) * p["norm"]["scale"]
  assert_rel_close(y, _dense(o, p["o_proj"]), TOL)


def test_layer_choice_follows_depth():
  mk = lambda i, n, dl=-1: transnormer.TransNormer(d_model=D, layer_idx=i, n_layers=n,
                                                   diag_layers=dl)
  assert [mk(i, 4).is_diag for i in range(4)] == [True, True, False, False]
  assert not mk(0, 1).is_diag
  assert [mk(i, 3, 1).is_diag for i in range(3)] == [True, False, False]
  assert isinstance(mk(0, 2).init_cache(1, 8), transnormer.DiagAttentionCache)
  assert isinstance(mk(1, 2).init_cache(1, 8), transnormer.NormAttentionCache)


def test_diag_attention_protocol():
  """Decode == parallel, chunked prefill inside and across blocks, segments (blocks of 4).

  Causality is the shared protocol test's (and the dense oracle's causal mask above)."""
  m = _diag()
  x = mt.random_inputs(2, 2, 13)
  runner = mt.Runner(m, mt.init_params(m, x))
  mt.check_decode_matches_parallel(runner, x)
  # Blocks of 4: the first chunk ends inside block 0, the second spans the boundary at 4 and
  # ends on the one at 8, the third holds a full block and one more token.
  assert_rel_close(runner.decode(x, chunks=[2, 6, 5]), runner(x)[0], TOL, "chunks 2+6+5")
  mt.check_segments(runner, x, 6)


def test_norm_attention_protocol():
  """NormAttention is not the registry's test_kwargs layer: causality, decode, prefill here."""
  m = _norm()
  x = mt.random_inputs(2, 2, 13)
  params = mt.init_params(m, x)
  runner = mt.Runner(m, params)
  mt.check_causal(m, params, x)
  mt.check_decode_matches_parallel(runner, x)
  mt.check_split_prefill(runner, x, 5)


def test_rejects_bad_block_size():
  m = transnormer.TransNormer(d_model=D, num_heads=H, block_size=0)
  with pytest.raises(ValueError, match="block_size=0"):
    m.init(jax.random.key(0), jnp.zeros((1, 4, D)))
