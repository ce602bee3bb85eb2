"""RetNet against the paper's (torchscale's) fully normalised parallel retention.

test_gla_family.py checks RetNet against parallel retention WITHOUT the paper's two extra
normalisations; the module docstring claims they are removed by the per-head GroupNorm. This file
checks that claim against an independent float64 transcription of torchscale's parallel form:

    D̃ = D / sqrt(rowsum(D))                 (decay mask, D[n, m] = γ^(n−m) for n >= m)
    A = (Q Kᵀ / sqrt(K)) ⊙ D̃
    A = A / max(|rowsum(A)|, 1)               (torchscale: detach().abs().sum(-1).clamp(min=1))
    o = GroupNorm_head(A V)

The two normalisations are per-(position, head) positive scalars c >= 1, so GroupNorm(o / c)
equals GroupNorm(o) up to eps: with eps = 1e-16 and var(o / c) > 1e4 eps (checked in the
test; var(o / c) reaches ~1e-8 at these inputs), the eps term changes the result by
< 0.5e-4 relative, below the float32 tolerance.
"""

import numpy as np

from seqmix.mixers import testing as mt
from seqmix.mixers.linear import retnet
from seqmix.testing import RTOL, assert_rel_close

D = mt.D_MODEL
TOL = RTOL["float32"]


def _rotate64(a, pos):
  half = a.shape[-1] // 2
  theta = 1.0 / 10000.0 ** (np.arange(half) / (half - 1))   # torchscale linspace(0, 1, K/2)
  z = (a[..., 0::2] + 1j * a[..., 1::2]) * np.exp(1j * pos[:, :, None, None] * theta)
  out = np.empty_like(a)
  out[..., 0::2], out[..., 1::2] = z.real, z.imag
  return out


def test_retnet_equals_torchscale_normalised_parallel_retention():
  h, eps = 2, 1e-16
  m = retnet.RetNet(d_model=D, num_heads=h, chunk_size=4, norm_eps=eps)
  x, p, y = mt.oracle_setup(m, 13, 2, 3)[:3]
  b, t, _ = x.shape
  kd = D // h
  heads = lambda a: a.reshape(b, t, h, -1)
  pos = np.broadcast_to(np.arange(t, dtype=np.float64), (b, t))
  q, k = (_rotate64(heads(x @ p[n]["kernel"]), pos) for n in ("q_proj", "k_proj"))
  v = heads(x @ p["v_proj"]["kernel"])
  gamma = 1.0 - 2.0 ** (-5.0 - np.arange(h))
  n_m = np.arange(t)[:, None] - np.arange(t)[None, :]
  mask = np.where(n_m >= 0, gamma[:, None, None] ** np.maximum(n_m, 0), 0.0)     # [h, n, m]
  mask = mask / np.sqrt(mask.sum(-1, keepdims=True))
  att = np.einsum("bnhk,bmhk->bhnm", q, k * kd ** -0.5) * mask                     # [b, h, n, m]
  att = att / np.maximum(np.abs(att.sum(-1, keepdims=True)), 1.0)
  o = np.einsum("bhnm,bmhv->bnhv", att, v)                                         # [b, n, h, v]
  var = o.var(-1, keepdims=True)
  assert var.min() > 1e4 * eps, "eps would matter: the derivation in the docstring fails"
  o = (o - o.mean(-1, keepdims=True)) / np.sqrt(var + eps)
  g = x @ p["g_proj"]["kernel"]
  o = g / (1.0 + np.exp(-g)) * o.reshape(b, t, -1)
  assert_rel_close(y, o @ p["o_proj"]["kernel"], TOL, "retnet vs torchscale parallel form")


def test_retnet_default_widths_follow_the_paper():
  # value_factor 2: V = 2D/H per head; key width D/H per head (torchscale / fla expand_v=2).
  c = retnet.RetNet(d_model=64, num_heads=4).init_cache(1, 8)
  assert c.state.shape == (1, 4, 16, 32)
