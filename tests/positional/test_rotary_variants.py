"""xPos, Resonance RoPE and NoPE's head temperature against float64 formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.positional import base, resonance


def _rot64(a, pos, theta):
  """Rotate-half on the first 2·len(theta) channels.  a [B,T,H,D], pos [B,T]."""
  r = 2 * len(theta)
  ang = pos[:, :, None, None].astype(np.float64) * theta
  a1, a2, rest = a[..., :r // 2], a[..., r // 2:r], a[..., r:]
  return np.concatenate([a1 * np.cos(ang) - a2 * np.sin(ang),
                         a2 * np.cos(ang) + a1 * np.sin(ang), rest], -1), ang


def _qk(seed=0, d=12):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((2, 5, 4, d)), rng.standard_normal((2, 5, 2, d))


POS = np.array([[0, 1, 7, 1000, 1039], [3, 4, 5, 6, 2000]])
# The float32 angle p·θ_i carries θ_i's rounding (relative ≲ 1e-6 through jnp.power) times
# p ≤ 2000, so up to ~2e-3 rad: rotated O(1) entries then differ by ≲ 2e-3 · |x| (|x| ≲ 4).
# Positions below 8 keep the angle error under 1e-5 and get the float32 tolerance.
SMALL = POS < 8
TOL_FAR = 1e-2


def _close(got, want):
  got = np.asarray(got, np.float64)
  np.testing.assert_allclose(got[SMALL], want[SMALL], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, want, atol=TOL_FAR)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_xpos_matches_formula(fraction):
  q, k = _qk()
  comp = base.build("xpos", num_heads=4, head_dim=12, rope_base=500.0, rope_fraction=fraction,
                    module_name=None)
  q2, k2 = comp.apply({}, jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                      jnp.asarray(POS), method="rotate")
  r = 2 * int(fraction * 12 // 2)
  theta = 500.0 ** (-np.arange(0, r, 2) / r)
  zeta = (np.arange(0, r, 2) + 0.4 * r) / (1.4 * r)
  scale = zeta ** (POS[:, :, None, None] / 512.0)                   # [b, t, 1, r/2]
  full = lambda s: np.concatenate([s, s, np.ones(s.shape[:-1] + (12 - r,))], -1)
  want_q = _rot64(q, POS, theta)[0] * full(scale)
  want_k = _rot64(k, POS, theta)[0] * full(1.0 / scale)
  _close(q2, want_q)
  _close(k2, want_k)


def test_xpos_product_depends_on_distance_only():
  q, k = _qk(1)
  comp = base.build("xpos", num_heads=4, head_dim=12, module_name=None)

  def dot(n, m):
    a, _ = comp.apply({}, jnp.asarray(q[:1, :1]), jnp.asarray(k[:1, :1, :1]),
                      jnp.full((1, 1), n), method="rotate")
    _, b = comp.apply({}, jnp.asarray(q[:1, :1]), jnp.asarray(k[:1, :1, :1]),
                      jnp.full((1, 1), m), method="rotate")
    return float(jnp.sum(a[0, 0, 0] * b[0, 0, 0]))

  # Angles are rounded in float32 at p ≈ 1000 (ulp/2 ≈ 3e-5 rad): a relative 1e-4 covers it.
  np.testing.assert_allclose([dot(1005, 1000), dot(5005, 5000)], dot(5, 0), rtol=1e-4)


def test_resonance_frequencies_and_periodicity():
  theta = 10000.0 ** (-np.arange(0, 16, 2) / 16)
  want = 2 * np.pi / np.round(2 * np.pi / theta)
  np.testing.assert_allclose(resonance.resonance_frequencies(16), want, rtol=1e-6)
  assert np.isclose(want[0], np.pi / 3)                             # wavelength 2π -> 6
  q, k = _qk(2, 16)
  comp = base.build("resonance", num_heads=4, head_dim=16, module_name=None)
  q2, _ = comp.apply({}, jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                     jnp.asarray(POS), method="rotate")
  _close(q2, _rot64(q, POS, want)[0])
  # Pair 0 repeats every 6 positions exactly (an integer wavelength), unlike plain RoPE.
  a = comp.apply({}, jnp.asarray(q[:1, :1]), jnp.asarray(k[:1, :1]), jnp.full((1, 1), 7),
                 method="rotate")[0]
  b = comp.apply({}, jnp.asarray(q[:1, :1]), jnp.asarray(k[:1, :1]), jnp.full((1, 1), 13),
                 method="rotate")[0]
  np.testing.assert_allclose(a[..., [0, 8]], b[..., [0, 8]], atol=1e-5)


def test_nope_temperature_scales_each_query_head():
  q, k = _qk(3)
  comp = base.build("nope_temperature", num_heads=4, head_dim=12, module_name=None)
  lam = np.array([0.5, 1.0, 2.0, 3.0], np.float32)
  q2, k2 = comp.apply({"params": {"temperature": lam}}, jnp.asarray(q, jnp.float32),
                      jnp.asarray(k, jnp.float32), jnp.asarray(POS), method="rotate")
  np.testing.assert_allclose(q2, q * lam[:, None], rtol=1e-6)
  np.testing.assert_array_equal(k2, np.asarray(k, np.float32))
  p = nn.meta.unbox(comp.init(jax.random.key(0), jnp.asarray(q), jnp.asarray(k),
                              jnp.asarray(POS), method="rotate"))
  np.testing.assert_array_equal(p["params"]["temperature"], np.ones(4))


def test_nope_is_the_identity():
  q, k = _qk(4)
  comp = base.build("nope", num_heads=4, head_dim=12, module_name=None)
  q2, k2 = comp.apply({}, q, k, POS, method="rotate")
  assert q2 is q and k2 is k and not comp.BIAS


def test_coca_logits_match_collinear_formula():
  """q'_n · k'_s equals Σ_i t_s^i |q_n^i|² cos((n − s)θ_i) + the pass-through channels."""
  q, k = _qk(5)
  comp = base.build("coca", num_heads=4, head_dim=12, rope_base=100.0, rope_fraction=0.5,
                    module_name=None)
  q2, k2 = comp.apply({}, jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                      jnp.asarray(POS), method="rotate")
  got = np.einsum("bthd,bshd->bhts", np.asarray(q2, np.float64),
                  np.repeat(np.asarray(k2, np.float64), 2, axis=2))
  r, half = 6, 3
  theta = 100.0 ** (-np.arange(0, r, 2) / r)
  want = np.zeros(got.shape)
  for b in range(2):
    for h in range(4):
      for n in range(5):
        for s in range(5):
          qn, ks = q[b, n, h], k[b, s, h // 2]
          mag = qn[:half] ** 2 + qn[half:r] ** 2
          t = np.maximum((ks[:half] + ks[half:r]) / 2, 0)
          cosd = np.cos((POS[b, n] - POS[b, s]) * theta)
          want[b, h, n, s] = np.sum(t * mag * cosd) + qn[r:] @ ks[r:]
  # Angles at positions up to 2000 in float32 (see TOL_FAR), times |q|²·t = O(10).
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=5e-2)
  small = SMALL[:, :, None] & SMALL[:, None, :]
  np.testing.assert_allclose(got.transpose(0, 2, 3, 1)[small], want.transpose(0, 2, 3, 1)[small],
                             rtol=1e-5, atol=1e-4)
