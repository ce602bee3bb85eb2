"""RoPE scaling: each `rope_scaling` type against Hugging Face's formula written out here in
float64 NumPy (independently of seqmix.positional.rope_scaling), plus a few literal values;
apply_rope with a dict; MHA decode == parallel past the training length; config errors; the
Giraffe, NTK-aware, entropy-ABF and scaling-law helpers."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.mixers import testing as mt
from seqmix.mixers.attention.mha import MHA
from seqmix.positional import rope, rope_scaling as rs
from seqmix.testing import RTOL, assert_rel_close

R, BASE, L0 = 16, 10000.0, 2048


def _theta(base=BASE, r=R):
  return base ** (-np.arange(0, r, 2, dtype=np.float64) / r)


def _hf_yarn(factor, l0, beta_fast=32.0, beta_slow=1.0, truncate=True):
  """YaRN as HF writes it, from the paper's definitions: the dimension at which a wavelength
  makes `n` rotations over l0, a linear ramp between the two, blended frequencies."""
  dim_of = lambda n: R * np.log(l0 / (n * 2 * np.pi)) / (2 * np.log(BASE))
  lo, hi = dim_of(beta_fast), dim_of(beta_slow)
  if truncate:
    lo, hi = np.floor(lo), np.ceil(hi)
  lo, hi = max(lo, 0), min(hi, R - 1)
  if lo == hi:
    hi += 0.001
  extrap = 1 - np.clip((np.arange(R // 2) - lo) / (hi - lo), 0, 1)
  th = _theta()
  return th / factor * (1 - extrap) + th * extrap


def _hf_llama3(factor, lo_f, hi_f, l0):
  th = _theta()
  out = []
  for t in th:
    wl = 2 * np.pi / t
    if wl < l0 / hi_f:
      out.append(t)
    elif wl > l0 / lo_f:
      out.append(t / factor)
    else:
      g = (l0 / wl - lo_f) / (hi_f - lo_f)
      out.append((1 - g) * t / factor + g * t)
  return np.array(out)


SHORT = [1.0 + 0.1 * i for i in range(R // 2)]
LONG = [2.0 + 0.5 * i for i in range(R // 2)]

# (rope_scaling, seq_len, expected inv_freq, expected attention factor)
TABLE = {
    "default": ({"rope_type": "default"}, None, _theta(), 1.0),
    "linear": ({"rope_type": "linear", "factor": 4.0}, None, _theta() / 4, 1.0),
    "linear_old_type_key": ({"type": "linear", "factor": 2.0}, None, _theta() / 2, 1.0),
    "dynamic_within": ({"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": L0},
                       1000, _theta(), 1.0),
    # base' = 10000 · (2 · 4096/2048 − 1)^(16/14) = 10000 · 3^(8/7)
    "dynamic_beyond": ({"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": L0},
                       4096, _theta(10000.0 * 3.0 ** (8 / 7)), 1.0),
    # attention factor 0.1 ln 4 + 1
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "max_position_embeddings": L0}, None,
             _hf_yarn(4.0, L0), 1.1386294361119890),
    "yarn_betas_attention_factor": (
        {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
         "attention_factor": 1.5, "max_position_embeddings": L0}, None,
        _hf_yarn(8.0, L0, 16.0, 2.0), 1.5),
    "yarn_no_truncate": ({"rope_type": "yarn", "factor": 4.0, "truncate": False,
                          "max_position_embeddings": L0}, None,
                         _hf_yarn(4.0, L0, truncate=False), 1.1386294361119890),
    # original given: factor = 8192/2048 = 4 overrides "factor"; mscale ratio
    # (0.1·1·ln4 + 1)/(0.1·0.5·ln4 + 1)
    "yarn_original_mscale": (
        {"rope_type": "yarn", "factor": 99.0, "original_max_position_embeddings": L0,
         "max_position_embeddings": 4 * L0, "mscale": 1.0, "mscale_all_dim": 0.5}, None,
        _hf_yarn(4.0, L0), (0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1)),
    # attention factor sqrt(1 + ln 4 / ln 2048) = sqrt(1 + 2/11) = sqrt(13/11)
    "longrope_short": ({"rope_type": "longrope", "factor": 4.0, "short_factor": SHORT,
                        "long_factor": LONG, "max_position_embeddings": L0}, 100,
                       _theta() / np.array(SHORT), math.sqrt(13 / 11)),
    "longrope_long": ({"rope_type": "longrope", "factor": 4.0, "short_factor": SHORT,
                       "long_factor": LONG, "max_position_embeddings": L0}, 3000,
                      _theta() / np.array(LONG), math.sqrt(13 / 11)),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, None,
               _hf_llama3(8.0, 1.0, 4.0, 64), 1.0),
    # NTK-aware: base · α^(R/(R−2))
    "ntk": ({"rope_type": "ntk", "factor": 4.0}, None, _theta(10000.0 * 4.0 ** (16 / 14)), 1.0),
    "abf": ({"rope_type": "abf", "rope_theta": 500000.0}, None, _theta(500000.0), 1.0),
    # transformers v5 style: rope_theta inside the dict replaces the base
    "linear_v5_rope_theta": ({"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
                             None, _theta(500000.0) / 2, 1.0),
    "giraffe_power": ({"rope_type": "giraffe_power", "power": 0.5}, None,
                      _theta() * (1 - 2 * np.arange(R // 2) / R) ** 0.5, 1.0),
    "giraffe_truncated": ({"rope_type": "giraffe_truncated", "a": 0.002, "b": 0.1,
                           "rho": 0.01}, None,
                          np.array([t if t >= 0.1 else (0.01 if t > 0.002 else 0.0)
                                    for t in _theta()]), 1.0),
}


@pytest.mark.parametrize("case", sorted(TABLE))
def test_inverse_frequencies_match_hf_formula(case):
  cfg, seq_len, want_inv, want_att = TABLE[case]
  inv, att = rs.rope_parameters(cfg, R, BASE, seq_len=seq_len)
  # float32 result vs float64 formula: 1 ulp of float32 relative.
  np.testing.assert_allclose(np.asarray(inv), want_inv, rtol=2e-7, atol=0)
  assert att == pytest.approx(want_att, rel=1e-12)


def test_table_is_not_trivial():
  """The yarn and llama3 rows do blend: some frequencies kept, some divided, some between."""
  for inv, s in ((TABLE["yarn"][2], 4.0), (TABLE["llama3"][2], 8.0)):
    ratio = _theta() / inv
    assert np.isclose(ratio[0], 1.0) and np.isclose(ratio[-1], s)
    assert np.any((ratio > 1.01) & (ratio < s - 0.01))


@pytest.mark.parametrize("case", ["dynamic_beyond", "longrope_long"])
def test_traced_seq_len_matches_static(case):
  cfg, seq_len, want_inv, _ = TABLE[case]
  inv, _ = rs.rope_parameters(cfg, R, BASE, seq_len=jnp.asarray(seq_len))
  np.testing.assert_allclose(np.asarray(inv), want_inv, rtol=2e-6)


def _rotate_hf(x, pos, inv, att):
  """HF's apply_rotary_pos_emb in float64: x·cos·a + rotate_half(x)·sin·a."""
  ang = pos[..., None].astype(np.float64) * inv                  # [b, t, r/2]
  cos = np.concatenate([np.cos(ang)] * 2, -1)[:, :, None] * att  # [b, t, 1, r]
  sin = np.concatenate([np.sin(ang)] * 2, -1)[:, :, None] * att
  half = x.shape[-1] // 2
  rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * cos + rot * sin


@pytest.mark.parametrize("case", ["yarn", "llama3", "dynamic_beyond", "longrope_long"])
def test_apply_rope_with_scaling_matches_hf_rotation(case):
  cfg, _, _, att = TABLE[case]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, R))
  # max position 4095 -> HF's current length 4096, the seq_len of the table row
  pos = np.array([[0, 7, 100, 2047, 4095], [1, 2, 3, 3000, 4000]])
  want = _rotate_hf(x, pos, TABLE[case][2], att)
  got = rope.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), rope_scaling=cfg)
  # angles up to 4095 rad are rounded in float32 (ulp/2 ≈ 2.4e-4 rad), see test_rope.
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-3 * att)


def test_linear_scaling_is_position_interpolation():
  """PI: rope with factor s at position s·p equals plain rope at p."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 6, 2, R)), jnp.float32)
  p = jnp.arange(6)[None]
  a = rope.apply_rope(x, 4 * p, rope_scaling={"rope_type": "linear", "factor": 4.0})
  np.testing.assert_allclose(np.asarray(a), np.asarray(rope.apply_rope(x, p)), atol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(rope.apply_rope(x, p, rope_scaling={"rope_type": "default"})),
      np.asarray(rope.apply_rope(x, p)))


TRAIN = 4   # "training length" of the small decode test; decode runs to T = 12 > 4
DECODE_CFGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "max_position_embeddings": TRAIN},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": TRAIN},
    "giraffe_power": {"rope_type": "giraffe_power", "power": 1.0},
}


@pytest.mark.parametrize("case", sorted(DECODE_CFGS))
def test_mha_decode_equals_parallel_past_training_length(case):
  mod = MHA(d_model=32, num_heads=4, rope_scaling=DECODE_CFGS[case])
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(0, 2, 12)
  y, _ = run(x)
  assert_rel_close(run.decode(x, chunks=[3] + [1] * 9), y, RTOL["float32"])
  plain = mt.Runner(MHA(d_model=32, num_heads=4), params)(x)[0]
  assert not np.allclose(np.asarray(plain), np.asarray(y), atol=1e-4)   # the scaling acts


@pytest.mark.parametrize("cfg", [
    {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 16},
    {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0, 1.5, 2.0, 3.0],
     "long_factor": [2.0, 3.0, 4.0, 5.0], "max_position_embeddings": 16},
])
def test_length_dependent_types_decode_within_training_length(cfg):
  """dynamic / longrope follow HF: the frequencies depend on the length of the call, and cached
  keys keep the frequencies they were written with. Within the training length both forms use
  the same frequencies and agree; beyond it the parallel form switches (HF does the same)."""
  mod = MHA(d_model=32, num_heads=4, rope_scaling=cfg)
  params = mt.init_params(mod)
  run = mt.Runner(mod, params)
  x = mt.random_inputs(0, 2, 12)
  assert_rel_close(run.decode(x), run(x)[0], RTOL["float32"])
  xl = mt.random_inputs(1, 1, 24)
  y_long = run(xl)[0]
  y_plain_cfg = mt.Runner(MHA(d_model=32, num_heads=4, rope_scaling=None if cfg["rope_type"]
                              == "dynamic" else {**cfg, "long_factor": cfg["short_factor"]}),
                          params)(xl)[0]
  assert not np.allclose(np.asarray(y_long), np.asarray(y_plain_cfg), atol=1e-4)


def test_bad_configs_name_the_problem():
  with pytest.raises(ValueError, match="rope_type='cubic' is unknown"):
    rs.rope_parameters({"rope_type": "cubic"}, R)
  with pytest.raises(ValueError, match="missing key.*'factor'"):
    rs.rope_parameters({"rope_type": "linear"}, R)
  with pytest.raises(ValueError, match="missing key.*'max_position_embeddings'"):
    rs.rope_parameters({"rope_type": "yarn", "factor": 2.0}, R)
  with pytest.raises(ValueError, match="missing key.*'high_freq_factor'"):
    rs.rope_parameters({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 64}, R)
  with pytest.raises(ValueError, match="short_factor has 3 entries"):
    rs.rope_parameters({"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 3,
                        "long_factor": [1.0] * 8, "max_position_embeddings": 64}, R)
  with pytest.raises(ValueError, match="rope_type='yarnn' is unknown"):
    MHA(d_model=32, num_heads=4, rope_scaling={"rope_type": "yarnn"}).init_cache(1, 4)


def test_scaling_law_helpers():
  # Liu et al.: LLaMA2 (head dim 128, base 10000, 4K training) has critical dimension 92.
  assert rs.critical_dimension(128, 10000.0, 4096) == 92
  bound = rs.extrapolation_bound(128, 1e6, 4096)
  assert bound == pytest.approx(2 * math.pi * 1e6 ** (92 / 128))
  assert rs.base_for_context(bound, 128, 4096) == pytest.approx(1e6)
  assert rs.ntk_aware_base(10000.0, 4.0, 16) == pytest.approx(10000.0 * 4 ** (16 / 14))
  # NTK-aware keeps θ_0 and divides the lowest frequency by exactly α.
  th = _theta(rs.ntk_aware_base(10000.0, 4.0, 16))
  assert th[0] == 1.0 and th[-1] == pytest.approx(_theta()[-1] / 4)


def test_entropy_aware_logit_scale():
  pos = jnp.asarray([[0, 15, 16, 255, 4095]])
  got = np.asarray(rs.entropy_aware_logit_scale(pos, 16))
  np.testing.assert_allclose(got, [[1.0, 1.0, math.log(17) / math.log(16), 2.0, 3.0]],
                             rtol=1e-6)
