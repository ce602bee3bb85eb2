"""CoPE against a plain-loop transcription of the paper's formula; key slot order."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqmix.positional import base, cope

B, T, H, G, DH, P = 2, 7, 4, 2, 8, 5


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, H, DH))
  k = rng.standard_normal((B, T, G, DH))
  seg = np.array([[0, 0, 0, 1, 1, 1, 1], [0] * T])
  i = np.arange(T)
  visible = (i[None, :, None] >= i[None, None, :]) & (seg[:, :, None] == seg[:, None, :])
  return q, k, visible


def _cope64(q, k, visible, emb):
  out = np.zeros((B, H, T, T))
  for b in range(B):
    for h in range(H):
      kh = k[b, :, h // (H // G)]
      for i in range(T):
        for j in range(T):
          p = sum(1.0 / (1.0 + np.exp(-(q[b, i, h] @ kh[t]) / np.sqrt(DH)))
                  for t in range(j, i + 1) if visible[b, i, t])
          p = min(p, P - 1)
          lo, hi = int(np.floor(p)), int(np.ceil(p))
          e = q[b, i, h] @ emb                                     # [P]
          out[b, h, i, j] = e[lo] + (p - lo) * (e[hi] - e[lo])
  return out


def _apply(comp, params, q, k, visible, k_idx=None):
  return np.asarray(comp.apply(params, jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                               None, None, k_idx=k_idx, visible=jnp.asarray(visible),
                               method="bias"), np.float64)


def test_cope_matches_formula():
  q, k, visible = _inputs()
  comp = base.build("cope", num_heads=H, head_dim=DH, kwargs={"npos_max": P}, module_name=None)
  emb = np.random.default_rng(1).standard_normal((DH, P)).astype(np.float32)
  params = {"params": {"pos_emb": emb}}
  got = _apply(comp, params, q, k, visible)
  want = _cope64(q, k, visible, emb.astype(np.float64))
  np.testing.assert_allclose(np.where(visible[:, None], got, 0), np.where(visible[:, None], want, 0),
                             rtol=1e-5, atol=1e-5)
  # The clamp is reached (positions up to 4 with P − 1 = 4) and fractional ones interpolate.
  init = nn.meta.unbox(comp.init(jax.random.key(0), jnp.asarray(q), jnp.asarray(k), None, None,
                                 visible=jnp.asarray(visible), method="bias"))
  assert not np.any(init["params"]["pos_emb"])    # starts as NoPE (the paper's zeros)


def test_keys_in_any_slot_order_give_the_same_bias():
  """A ring-buffer cache holds keys out of token order: with k_idx the sum still runs over
  keys j .. i in token order, so permuting the key slots permutes the bias the same way."""
  q, k, visible = _inputs(2)
  comp = base.build("cope", num_heads=H, head_dim=DH, kwargs={"npos_max": 16}, module_name=None)
  emb = np.random.default_rng(3).standard_normal((DH, 16)).astype(np.float32)
  params = {"params": {"pos_emb": emb}}
  ordered = _apply(comp, params, q, k, visible)
  perm = np.array([3, 6, 0, 5, 1, 4, 2])
  k_idx = jnp.broadcast_to(jnp.asarray(perm), (B, T))
  shuffled = _apply(comp, params, q, k[:, perm], visible[:, :, perm], k_idx=k_idx)
  np.testing.assert_allclose(shuffled, ordered[..., perm], rtol=1e-6, atol=1e-6)
  g = np.random.default_rng(4).random((B, 1, 1, T))
  np.testing.assert_allclose(cope.suffix_sum(jnp.asarray(g)),
                             np.cumsum(g[..., ::-1], -1)[..., ::-1], rtol=1e-6)
