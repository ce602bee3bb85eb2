"""The RoPE-scaling positional components: each rotates exactly as `apply_rope` with the
equivalent Hugging Face dict (whose frequencies test_rope_scaling checks against the
formulas); entropy-ABF's query scale and the scaling-law base against numpy formulas;
decode == parallel inside mha past the training length (every component also runs in
test_components_in_mha under -m slow)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.mha import MHA
from seqmix.positional import base, rope
from seqmix.testing import RTOL, assert_rel_close

H, G, DH = 4, 2, 16
RNG = np.random.default_rng(0)
Q = jnp.asarray(RNG.standard_normal((2, 6, H, DH)), jnp.float32)
K = jnp.asarray(RNG.standard_normal((2, 6, G, DH)), jnp.float32)
POS = jnp.asarray([[0, 1, 5, 255, 700, 3000], [2, 3, 4, 100, 1024, 1025]], jnp.int32)

EQUIVALENT = {
    "pi": ({"factor": 2.0}, {"rope_type": "linear", "factor": 2.0}),
    "ntk_aware": ({"alpha": 3.0}, {"rope_type": "ntk", "factor": 3.0}),
    "dynamic_ntk": ({"factor": 2.0, "train_len": 256, "context_len": 1024},
                    {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 256}),
    "yarn": ({"factor": 4.0, "train_len": 256},
             {"rope_type": "yarn", "factor": 4.0, "max_position_embeddings": 256}),
    "longrope": ({"factor": 4.0, "train_len": 256, "context_len": 1024,
                  "long_factor": tuple(1.0 + i for i in range(8))},
                 {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0] * 8,
                  "long_factor": [1.0 + i for i in range(8)], "max_position_embeddings": 256}),
    "llama3_rope": ({"factor": 8.0, "train_len": 64},
                    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "abf": ({"abf_base": 5e5}, {"rope_type": "abf", "rope_theta": 5e5}),
    "giraffe_power": ({"power": 1.0}, {"rope_type": "giraffe_power", "power": 1.0}),
    "giraffe_truncated": ({}, {"rope_type": "giraffe_truncated", "a": 1e-3, "b": 0.1,
                               "rho": 0.01}),
}


def _rotate(name, kw):
  comp = base.build(name, num_heads=H, head_dim=DH, kwargs=kw, module_name=None)
  return comp.apply({}, Q, K, POS, method="rotate")


@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_component_rotates_as_apply_rope_with_the_dict(name):
  kw, cfg = EQUIVALENT[name]
  q2, k2 = _rotate(name, kw)
  # dynamic / longrope: the component's fixed context_len plays HF's current length.
  seq_pos = POS if name not in ("dynamic_ntk", "longrope") else None
  if seq_pos is None:
    from seqmix.positional import rope_scaling as rs
    inv, att = rs.rope_parameters(cfg, DH, seq_len=1024)
    want_q = _hf(np.asarray(Q), np.asarray(POS), np.asarray(inv, np.float64), att)
    np.testing.assert_allclose(np.asarray(q2), want_q, atol=2e-3)
  else:
    np.testing.assert_allclose(np.asarray(q2), np.asarray(rope.apply_rope(Q, POS,
                               rope_scaling=cfg)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(k2), np.asarray(rope.apply_rope(K, POS,
                               rope_scaling=cfg)), atol=1e-6)


def _hf(x, pos, inv, att):
  ang = pos[..., None].astype(np.float64) * inv
  cos = np.concatenate([np.cos(ang)] * 2, -1)[:, :, None] * att
  sin = np.concatenate([np.sin(ang)] * 2, -1)[:, :, None] * att
  half = x.shape[-1] // 2
  return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin


def test_entropy_abf_scales_queries_by_log_length():
  q2, k2 = _rotate("entropy_abf", {"abf_base": 5e5, "train_len": 256})
  theta = 5e5 ** (-np.arange(0, DH, 2) / DH)
  lam = np.maximum(1.0, np.log(np.asarray(POS) + 1.0) / math.log(256))[:, :, None, None]
  # angles up to 3000 rad rounded in float32 (ulp/2 ≈ 1.2e-4): atol 1e-3 with |λq| <= ~5
  np.testing.assert_allclose(np.asarray(q2), _hf(np.asarray(Q), np.asarray(POS), theta, 1.0)
                             * lam, atol=1e-3)
  np.testing.assert_allclose(np.asarray(k2), _hf(np.asarray(K), np.asarray(POS), theta, 1.0),
                             atol=1e-3)
  assert lam[0, 0, 0, 0] == 1.0 and lam[0, 5, 0, 0] > 1.4


def test_scaling_law_base_uses_the_critical_dimension_rule():
  q2, _ = _rotate("scaling_law_base", {"train_len": 256, "target_len": 4096})
  d_extra = 2 * math.ceil(DH / 2 * math.log(256 / (2 * math.pi)) / math.log(10000.0))  # = 8
  beta = (4096 / (2 * math.pi)) ** (DH / d_extra)
  theta = beta ** (-np.arange(0, DH, 2) / DH)
  np.testing.assert_allclose(np.asarray(q2), _hf(np.asarray(Q), np.asarray(POS), theta, 1.0),
                             atol=1e-3)


@pytest.mark.parametrize("name", ["yarn", "entropy_abf"])
def test_decode_matches_parallel_in_mha(name):
  mod = MHA(d_model=32, num_heads=4, num_kv_heads=2, position=name)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(0, 2, 12)
  pos = 1000 + jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  y, _ = run(x, positions=pos)
  assert_rel_close(run.decode(x, positions=pos, chunks=[5] + [1] * 7), y, RTOL["float32"])


def test_bad_field_is_named():
  with pytest.raises(ValueError, match="missing key|must be >= 1|unknown"):
    _rotate("ntk_aware", {"alpha": 0.5})
