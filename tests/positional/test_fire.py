"""FIRE against its float64 formula from the component's own parameters."""

import flax.linen as nn
import jax
import numpy as np

from seqmix.positional import base

Q_POS = np.array([[0, 3, 700, 1039]])
K_POS = np.array([[0, 1, 3, 500, 700, 1039]])


def _fire64(p, q_pos, k_pos, init_L=512.0, eps=1e-6):
  c, lm = float(p["c"]), float(p["L_multiplier"])
  psi = lambda x: np.log(np.abs(c * x) + 1.0)
  dist = (q_pos[:, None] - k_pos[None, :]).astype(np.float64)
  norm = psi(np.maximum(q_pos.astype(np.float64), abs(lm * init_L))) + eps
  u = (psi(dist) / norm[:, None])[..., None]                        # [t, s, 1]
  hid = np.maximum(u @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"], 0.0)
  return np.moveaxis(hid @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"], -1, 0)  # [h, t, s]


def test_fire_matches_formula():
  comp = base.build("fire", num_heads=3, head_dim=8, module_name=None)
  params = nn.meta.unbox(comp.init(jax.random.key(0), None, None, Q_POS, K_POS, method="bias"))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(np.shape(a)).astype(np.float32),
                        params)
  params["params"]["L_multiplier"] = np.float32(0.5)   # threshold L = 256: 700 and 1039 past it
  got = np.asarray(comp.apply(params, None, None, Q_POS, K_POS, method="bias"), np.float64)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  want = _fire64(p64, Q_POS[0], K_POS[0])
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)


def test_progressive_interpolation_keeps_normalised_distance_in_unit_interval():
  """Past the threshold the distance is divided by ψ(query position): the bias of the oldest
  key (distance = position) is the same at every long query position."""
  comp = base.build("fire", num_heads=2, head_dim=8, kwargs={"init_L": 16.0}, module_name=None)
  q = np.array([[100, 1000, 10000]])
  params = comp.init(jax.random.key(1), None, None, q, q, method="bias")
  far = [np.asarray(comp.apply(params, None, None, q[:, i:i + 1], np.zeros((1, 1)),
                               method="bias"))[0, :, 0, 0] for i in range(3)]
  np.testing.assert_allclose(far[0], far[1], rtol=1e-5)
  np.testing.assert_allclose(far[0], far[2], rtol=1e-5)
