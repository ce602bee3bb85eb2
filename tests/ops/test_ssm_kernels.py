"""S4 / S4D kernel generators against their own recurrences, and the HiPPO-LegS matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from seqmix.ops import ssm_kernels as sk
from seqmix.ops.scan import linear_scan
from seqmix.testing import RTOL, assert_rel_close

try:
  from seqmix.ops.conv import causal_conv
except ImportError:  # the conv op is another engineer's; fall back to the direct sum
  causal_conv = None

H, L = 3, 64


def _conv(u, k):
  if causal_conv is not None:
    return causal_conv(u, k, impl="reference")[0]
  return jnp.stack([jnp.einsum("ld,bld->bd", k[:t + 1], u[:, t::-1][:, :t + 1])
                    for t in range(u.shape[1])], 1)


def _log_step(seed):
  return jnp.asarray(np.random.default_rng(seed).uniform(np.log(0.05), np.log(0.2), H),
                     jnp.float32)


def _complex(rng, *shape):
  return (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / np.sqrt(2)


def _unroll(a_bar, b_bar, c_bar, length, diagonal):
  """K[l] = Re(C̄ Ā^l B̄) by iterating x <- Ā x from x = B̄ (float64 numpy)."""
  a_bar, b_bar, c_bar = (np.asarray(v, np.complex128) for v in (a_bar, b_bar, c_bar))
  x, out = b_bar, []
  for _ in range(length):
    out.append(np.sum(c_bar * x, -1).real)
    x = a_bar * x if diagonal else np.einsum("hmn,hn->hm", a_bar, x)
  return np.stack(out)  # [l, h]


def test_hippo_legs_closed_form():
  n = 7
  a, b = sk.hippo_legs(n)
  for i in range(n):
    assert b[i] == pytest.approx(np.sqrt(2 * i + 1))
    for k in range(n):
      want = (-np.sqrt((2 * i + 1) * (2 * k + 1)) if i > k else -(i + 1.0) if i == k else 0.0)
      assert a[i, k] == pytest.approx(want)
  a, p, _ = sk.nplr_legs(n)
  normal = a + np.outer(p, p)
  np.testing.assert_allclose(normal + normal.T, -np.eye(n), atol=1e-12)  # -I/2 + skew


@pytest.mark.parametrize("conj", [True, False])
def test_dplr_legs_reconstructs_hippo(conj):
  n = 8
  lam, p, b, v = sk.dplr_legs(n, conj=conj)
  if conj:
    assert lam.shape == (n // 2,) and np.all(lam.imag > 0)
    lam, p, b, v = (np.concatenate([x, x.conj()], -1) for x in (lam, p, b, v))
  np.testing.assert_allclose(lam.real, -0.5, atol=1e-12)
  a, b_legs = sk.hippo_legs(n)
  rebuilt = v @ (np.diag(lam) - np.outer(p, p.conj())) @ v.conj().T
  np.testing.assert_allclose(rebuilt, a, atol=1e-9)
  np.testing.assert_allclose(v @ b, b_legs, atol=1e-9)


def _s4_params(seed, rank=1, shared=True):
  rng = np.random.default_rng(seed)
  lam, p, b, _ = sk.dplr_legs(16)
  if not shared:  # per-channel parameters, perturbed so channels differ
    lam = lam[None] + 0.1 * _complex(rng, H, lam.shape[0]) - 0.1
    b = b[None] + 0.1 * _complex(rng, H, b.shape[0])
  if rank > 1:
    p = np.stack([p] + [0.3 * _complex(rng, p.shape[-1]) for _ in range(rank - 1)])
    p = np.broadcast_to(p[:, None], (rank, H, p.shape[-1]))  # [r, h, n]
  c = _complex(rng, H, 8)
  return (jnp.asarray(lam, jnp.complex64), jnp.asarray(p, jnp.complex64),
          jnp.asarray(b, jnp.complex64), jnp.asarray(c, jnp.complex64), _log_step(seed))


@pytest.mark.parametrize("rank,shared,conj", [(1, True, True), (2, False, True),
                                              (1, False, False)])
def test_s4_kernel_matches_unrolled_recurrence(rank, shared, conj):
  lam, p, b, c, log_step = _s4_params(0, rank, shared)
  k = sk.s4_kernel(lam, p, b, c, log_step, L, conj=conj)
  assert k.shape == (L, H) and k.dtype == jnp.float32
  a_bar, b_bar, c_bar = sk.s4_discrete(lam, p, b, c, log_step, L, conj=conj)
  assert a_bar.shape == (H, 16 if conj else 8, 16 if conj else 8)
  assert_rel_close(k, _unroll(a_bar, b_bar, c_bar, L, diagonal=False), RTOL["float32"], "K")


@pytest.mark.parametrize("init,disc", [("lin", "zoh"), ("inv", "bilinear"), ("lin", "bilinear"),
                                       ("inv", "zoh")])
def test_s4d_kernel_matches_unrolled_recurrence(init, disc):
  rng = np.random.default_rng(1)
  a = jnp.asarray(sk.s4d_lin(16) if init == "lin" else sk.s4d_inv(16), jnp.complex64)
  b = jnp.ones((8,), jnp.complex64)
  c = jnp.asarray(_complex(rng, H, 8), jnp.complex64)
  log_step = _log_step(1)
  k = sk.s4d_kernel(a, b, c, log_step, L, disc)
  a_bar, b_bar, c_scaled = sk.s4d_discrete(a, b, c, log_step, disc)
  assert_rel_close(k, _unroll(a_bar, b_bar, c_scaled, L, diagonal=True), RTOL["float32"], "K")


def _s4d_numpy(a, b, c, log_step, length, disc, conj):
  """S4D from its formulas in float64 numpy: (Ā, B̄, scale · C) [H, N'] and K [L, H].

  zoh: Ā = e^{ΔA}, B̄ = (e^{ΔA} - 1)/A · B; bilinear: Ā = (1 + ΔA/2)/(1 - ΔA/2),
  B̄ = Δ B/(1 - ΔA/2); K_l = scale · Re Σ_n C_n B̄_n Ā_n^l, scale 2 under conjugate symmetry.
  """
  h = log_step.shape[0]
  a, b, c = (np.broadcast_to(np.asarray(x, np.complex128), (h, np.shape(x)[-1]))
             for x in (a, b, c))
  dt = np.exp(np.asarray(log_step, np.float64))[:, None]              # [h, 1]
  if disc == "zoh":
    a_bar = np.exp(dt * a)
    b_bar = (a_bar - 1.0) / a * b
  else:
    a_bar = (1.0 + dt * a / 2.0) / (1.0 - dt * a / 2.0)
    b_bar = dt * b / (1.0 - dt * a / 2.0)
  scale = 2.0 if conj else 1.0
  powers = a_bar[None] ** np.arange(length)[:, None, None]           # [l, h, n]
  k = scale * np.einsum("hn,lhn->lh", c * b_bar, powers).real
  return a_bar, b_bar, scale * c, k


@pytest.mark.parametrize("init,disc,conj,shared", [("lin", "zoh", True, False),
                                                   ("inv", "bilinear", True, True),
                                                   ("inv", "zoh", False, True),
                                                   ("lin", "bilinear", False, False)])
def test_s4d_matches_float64_formulas(init, disc, conj, shared):
  """`s4d_discrete` and `s4d_kernel` against the ZOH / bilinear formulas of the S4D paper in
  float64 numpy (the kernel-vs-recurrence test above shares `_s4d_discretise` on both sides)."""
  rng = np.random.default_rng(5)
  a = sk.s4d_lin(16) if init == "lin" else sk.s4d_inv(16)
  if not shared:  # per-channel A, perturbed so that channels differ (Re A stays < 0)
    a = a[None] + 0.1 * _complex(rng, H, a.shape[0])
  b, c = _complex(rng, *a.shape), _complex(rng, H, 8)
  log_step = _log_step(5)
  a_bar, b_bar, c_scaled, k = _s4d_numpy(a, b, c, log_step, L, disc, conj)
  as64 = lambda x: jnp.asarray(x, jnp.complex64)
  got = sk.s4d_discrete(as64(a), as64(b), as64(c), log_step, disc, conj=conj)
  for name, x, want in zip(("A_bar", "B_bar", "C_scaled"), got, (a_bar, b_bar, c_scaled)):
    assert_rel_close(x, want, RTOL["float32"], name)
  assert_rel_close(sk.s4d_kernel(as64(a), as64(b), as64(c), log_step, L, disc, conj=conj), k,
                   RTOL["float32"], "K")


def test_s4d_discretisations_agree_for_small_steps():
  # ZOH and bilinear differ by O(Δ²); both must approach the same continuous kernel.
  a = jnp.asarray(sk.s4d_lin(8), jnp.complex64)
  c = jnp.ones((4,), jnp.complex64)
  log_step = jnp.full((1,), np.log(1e-3), jnp.float32)
  kz = sk.s4d_kernel(a, jnp.ones_like(c), c, log_step, 32, "zoh")
  kb = sk.s4d_kernel(a, jnp.ones_like(c), c, log_step, 32, "bilinear")
  assert_rel_close(kb, kz, 1e-4, "bilinear vs zoh")  # O((Δ |A|)²) with Δ|A| <= 1e-2


def test_s4d_convolution_equals_recurrence():
  rng = np.random.default_rng(2)
  a = jnp.asarray(sk.s4d_inv(16), jnp.complex64)
  b = jnp.asarray(_complex(rng, H, 8), jnp.complex64)
  c = jnp.asarray(_complex(rng, H, 8), jnp.complex64)
  log_step = _log_step(2)
  u = jnp.asarray(rng.normal(size=(2, L, H)), jnp.float32)
  y_conv = _conv(u, sk.s4d_kernel(a, b, c, log_step, L, "zoh"))
  a_bar, b_bar, c_scaled = sk.s4d_discrete(a, b, c, log_step, "zoh")
  x = u[..., None] * b_bar  # [b, t, h, n]
  h, _ = linear_scan(jnp.broadcast_to(a_bar, x.shape), x, impl="reference")
  y_rec = jnp.einsum("bthn,hn->bth", h, c_scaled).real
  assert_rel_close(y_conv, y_rec, RTOL["float32"], "y")


def test_s4_convolution_equals_recurrence():
  lam, p, b, c, log_step = _s4_params(3, rank=1, shared=False)
  u = jnp.asarray(np.random.default_rng(3).normal(size=(2, L, H)), jnp.float32)
  y_conv = _conv(u, sk.s4_kernel(lam, p, b, c, log_step, L))
  a_bar, b_bar, c_bar = sk.s4_discrete(lam, p, b, c, log_step, L)

  def step(x, u_t):  # x [b, h, m]
    x = jnp.einsum("hmn,bhn->bhm", a_bar, x) + u_t[..., None] * b_bar
    return x, jnp.einsum("bhm,hm->bh", x, c_bar).real

  x0 = jnp.zeros((2,) + b_bar.shape, jnp.complex64)
  _, y_rec = lax.scan(step, x0, jnp.moveaxis(u, 1, 0))
  assert_rel_close(y_conv, jnp.moveaxis(y_rec, 0, 1), RTOL["float32"], "y")


def test_kernel_gradients_finite():
  lam, p, b, c, log_step = _s4_params(4)
  g = jax.grad(lambda *a: jnp.sum(sk.s4_kernel(*a, L) ** 2), argnums=(0, 1, 2, 3, 4))(
      lam, p, b, c, log_step)
  a = jnp.asarray(sk.s4d_lin(16), jnp.complex64)
  g += jax.grad(lambda a, c, s: jnp.sum(sk.s4d_kernel(a, c, c, s, L, "bilinear") ** 2),
                argnums=(0, 1, 2))(a, c, log_step)
  for x in g:
    assert np.all(np.isfinite(np.asarray(x)))


def test_errors():
  with pytest.raises(ValueError, match="even"):
    sk.dplr_legs(7)
  with pytest.raises(ValueError, match="disc"):
    sk.s4d_kernel(sk.s4d_lin(4), 1.0 + 0 * sk.s4d_lin(4), sk.s4d_lin(4), jnp.zeros(1), 8, "euler")
