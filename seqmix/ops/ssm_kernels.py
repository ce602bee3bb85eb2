"""Convolution kernels of linear time-invariant SSMs: S4 (DPLR, Cauchy + Woodbury) and S4D.

A continuous SSM x' = A x + B u, y = C x, discretised with step Δ, is the causal convolution
y = K * u with K_l = C Ā^l B̄. The generators below compute K [L, H] for H independent SSMs
(one per channel) directly, without running the recurrence, in the layout of
`seqmix.ops.conv.causal_conv` (`K[0]` multiplies the current token). The matching `*_discrete`
functions return (Ā, B̄, C̄) so a mixer can run the same SSM as a recurrence when decoding.

Conjugate symmetry (`conj=True`, the S4/S4D default): the N' listed complex states stand for
2N' states, the listed ones and their complex conjugates (B, C, P likewise), so the SSM is
real and K is real. With `conj=False` the listed states are the whole (complex) system and K
is its real part.

S4 (Gu et al. 2022, "Efficiently Modeling Long Sequences with Structured State Spaces"):
  A = diag(Λ) - P Q^*, the normal-plus-low-rank form of HiPPO-LegS in its eigenbasis
  (`dplr_legs`; Q = P there), discretised with the bilinear transform
  Ā = (I - Δ/2 A)^{-1}(I + Δ/2 A), B̄ = (I - Δ/2 A)^{-1} Δ B. `s4_kernel` takes S4's C̃ =
  C̄ (I - Ā^L) (the length-L truncated generating function is then exact at the L-th roots of
  unity z): K̂(z) = C̃ (I - Ā z)^{-1} B̄ = 2 C̃ (2/Δ (1-z) - A (1+z))^{-1} B, inverted by the
  Woodbury identity around the diagonal part (Cauchy sums) and brought back by an inverse FFT.
  Writing the resolvent with the factor (1+z) multiplied through (instead of S4's
  g(z) = 2/Δ (1-z)/(1+z)) keeps the z = -1 frequency finite. S4 is bilinear only (ZOH of a
  non-diagonal A has no Cauchy form).

S4D (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space
Models"): A diagonal, K_l = Σ_n C_n B̄_n Ā_n^l (times 2, real part, under conj symmetry), a
Vandermonde product. `disc="zoh"`: Ā = e^{ΔA}, B̄ = (e^{ΔA} - 1)/A · B;
`disc="bilinear"`: Ā = (1 + ΔA/2)/(1 - ΔA/2), B̄ = Δ B/(1 - ΔA/2). Inits: `s4d_lin`
(A_n = -1/2 + iπn) and `s4d_inv` (A_n = -1/2 + i N/π (N/(2n+1) - 1)).

Shapes: H channels, N' listed states; Λ / A, P, Q, B, C are [N'] (shared by all channels) or
[H, N']; P, Q of rank R > 1 are [R, H, N']; `log_step` is [H] (Δ = e^{log_step}).
Kernels are float32 [L, H], computed in complex64. The init helpers return float64/complex128
numpy arrays (init-time constants; cast them in the mixer).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

DISCRETISATIONS = ("zoh", "bilinear")


def hippo_legs(n: int):
  """HiPPO-LegS in the stable sign: (A [N, N], B [N]) float64.

  A_nk = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k, 0 for n < k; B_n = sqrt(2n+1).
  """
  q = np.sqrt(2.0 * np.arange(n) + 1.0)
  a = np.tril(np.outer(q, q), -1) + np.diag(np.arange(n) + 1.0)
  return -a, q.copy()


def nplr_legs(n: int):
  """HiPPO-LegS as normal plus low rank: (A [N, N], P [N], B [N]) with A + P Pᵀ normal.

  P_n = sqrt(n + 1/2); A + P Pᵀ = -I/2 + (a skew-symmetric matrix).
  """
  a, b = hippo_legs(n)
  return a, np.sqrt(np.arange(n) + 0.5), b


def dplr_legs(n: int, conj: bool = True):
  """HiPPO-LegS diagonalised: (Λ, P, B, V), complex128, with A = V (diag Λ - P P^*) V^*.

  V is unitary [N, N] and P, B are in its eigenbasis (P = V^* P_nplr, B = V^* B). With conj=True
  (N even) only the N/2 eigenvalues with positive imaginary part are kept (V [N, N/2]); the
  others are their conjugates, as `s4_kernel(conj=True)` assumes. Re Λ = -1/2 exactly.
  """
  a, p, b = nplr_legs(n)
  skew = a + np.outer(p, p) + 0.5 * np.eye(n)
  # -i·skew is Hermitian: its real eigenvalues w give the eigenvalues i·w of the skew part.
  w, v = np.linalg.eigh(-1j * skew)
  lam = -0.5 + 1j * w
  if conj:
    if n % 2:
      raise ValueError(f"dplr_legs: conj=True pairs eigenvalues, so N must be even; got {n}.")
    keep = np.argsort(w)[n // 2:]  # the positive half; the negative half are conjugates
    lam, v = lam[keep], v[:, keep]
  vh = v.conj().T
  return lam, vh @ p, vh @ b, v


def s4d_lin(n: int):
  """S4D-Lin: A_k = -1/2 + iπk, k < N/2 (N' = N/2 conjugate-pair states), complex128."""
  return -0.5 + 1j * np.pi * np.arange(n // 2)


def s4d_inv(n: int):
  """S4D-Inv: A_k = -1/2 + i N/π (N/(2k+1) - 1), k < N/2, complex128."""
  k = np.arange(n // 2)
  return -0.5 + 1j * (n / np.pi) * (n / (2.0 * k + 1.0) - 1.0)


def _per_channel(x, h, name):
  """[N'] or [H, N'] -> [H, N'] complex64 (leading rank axes kept for P, Q)."""
  x = jnp.asarray(x)
  x = x.astype(jnp.complex64)
  if x.ndim == 1:
    return jnp.broadcast_to(x, (h, x.shape[0]))
  if x.shape[-2] != h:
    raise ValueError(f"{name} must be [N'] or [H, N'] with H={h} (log_step's length); got "
                     f"{x.shape}.")
  return x


def _low_rank(x, h, name):
  """P or Q: [N'], [H, N'] -> rank 1; [R, H, N'] -> rank R. Returns [R, H, N']."""
  x = jnp.asarray(x)
  if x.ndim == 3:
    return jnp.stack([_per_channel(r, h, name) for r in x])
  return _per_channel(x, h, name)[None]


def _steps(log_step):
  log_step = jnp.asarray(log_step, jnp.float32)
  if log_step.ndim != 1:
    raise ValueError(f"log_step must be [H]; got {log_step.shape}.")
  return jnp.exp(log_step), log_step.shape[0]


@functools.partial(jax.jit, static_argnames=("L", "conj"))
def s4_kernel(Lambda, P, B, C, log_step, L: int, *, Q=None, conj: bool = True):
  """S4's DPLR convolution kernel (module docstring), bilinear discretisation.

  Args:
    Lambda: [N'] or [H, N'] complex diagonal of A (Re < 0 for a stable SSM).
    P: [N'], [H, N'] or [R, H, N'] low-rank factor, A = diag(Λ) - P Q^*.
    B: [N'] or [H, N'] input vector.
    C: [N'] or [H, N'] output vector C̃ = C̄ (I - Ā^L) (S4's parameterisation).
    log_step: [H] log Δ.
    L: kernel length (static).
    Q: like P; None means Q = P (HiPPO-LegS).
    conj: the states come with implied complex conjugates.

  Returns:
    K [L, H] float32, K[l] = C̄ Ā^l B̄ (real).
  """
  step, h = _steps(log_step)
  lam = _per_channel(Lambda, h, "Lambda")
  b, c = _per_channel(B, h, "B"), _per_channel(C, h, "C")
  p = _low_rank(P, h, "P")
  q = p if Q is None else _low_rank(Q, h, "Q")
  z = jnp.exp(-2j * jnp.pi * jnp.arange(L) / L).astype(jnp.complex64)  # [l]
  # r_n(z) = 1 / (2/Δ (1 - z) - λ_n (1 + z)), for λ and (conj) for conj(λ).
  two_over_step = (2.0 / step)[:, None, None]  # [h, 1, 1]

  def resolvent(lam):
    return 1.0 / (two_over_step * (1.0 - z)[None, :, None]
                  - lam[:, None, :] * (1.0 + z)[None, :, None])  # [h, l, n]

  r = resolvent(lam)
  r_conj = resolvent(jnp.conj(lam)) if conj else None

  def cauchy(v):
    """Σ_n v_n r_n(z) (+ conj(v_n) r_n^conj(z)); v [..., h, n] -> [..., h, l]."""
    out = jnp.einsum("...hn,hln->...hl", v, r)
    if conj:
      out = out + jnp.einsum("...hn,hln->...hl", jnp.conj(v), r_conj)
    return out

  s_cb = cauchy(c * b)  # [h, l]
  s_cp = cauchy(c[None] * p)  # [r, h, l]
  s_qb = cauchy(jnp.conj(q) * b[None])  # [r, h, l]
  s_qp = cauchy(jnp.conj(q)[:, None] * p[None])  # [r, s, h, l]: Σ conj(Q_r) P_s r
  one_plus_z = 1.0 + z
  rank = p.shape[0]
  # (I + (1+z) S_QP)^{-1} S_QB, an R x R solve per (channel, frequency).
  m = jnp.eye(rank, dtype=jnp.complex64)[:, :, None, None] + one_plus_z * s_qp
  m = jnp.moveaxis(m, (0, 1), (-2, -1))  # [h, l, r, s]
  sol = jnp.linalg.solve(m, jnp.moveaxis(s_qb, 0, -1)[..., None])[..., 0]  # [h, l, r]
  woodbury = jnp.einsum("rhl,hlr->hl", s_cp, sol)
  k_hat = 2.0 * (s_cb - one_plus_z * woodbury)  # [h, l], K's DFT at z = e^{-2πik/L}
  k = jnp.fft.ifft(k_hat, n=L, axis=-1).real  # [h, l]
  return k.T.astype(jnp.float32)  # [l, h]


@functools.partial(jax.jit, static_argnames=("L", "conj"))
def s4_discrete(Lambda, P, B, C, log_step, L: int, *, Q=None, conj: bool = True):
  """The recurrence whose impulse response is `s4_kernel(...)`: dense (Ā, B̄, C̄).

  Run it as h_t = Ā h_{t-1} + B̄ u_t, y_t = Re(C̄ h_t), per channel.

  Returns:
    (A_bar [H, M, M], B_bar [H, M], C_bar [H, M]) complex64, M = 2N' if conj else N' (the
    listed states first, then their conjugates).
  """
  step, h = _steps(log_step)
  lam = _per_channel(Lambda, h, "Lambda")
  b, c = _per_channel(B, h, "B"), _per_channel(C, h, "C")
  p = _low_rank(P, h, "P")
  q = p if Q is None else _low_rank(Q, h, "Q")
  if conj:
    lam, b, c = (jnp.concatenate([x, jnp.conj(x)], -1) for x in (lam, b, c))
    p, q = (jnp.concatenate([x, jnp.conj(x)], -1) for x in (p, q))
  m = lam.shape[-1]
  eye = jnp.eye(m, dtype=jnp.complex64)
  a = (lam[:, :, None] * eye - jnp.einsum("rhm,rhn->hmn", p, jnp.conj(q)))  # [h, m, m]
  half = (step / 2.0)[:, None, None]
  back = eye - half * a
  a_bar = jnp.linalg.solve(back, eye + half * a)
  b_bar = jnp.linalg.solve(back, (step[:, None] * b)[..., None])[..., 0]
  a_pow = jnp.linalg.matrix_power(a_bar, L)
  # C̄ = C̃ (I - Ā^L)^{-1}: solve (I - Ā^L)^T C̄^T = C̃^T.
  c_bar = jnp.linalg.solve(jnp.swapaxes(eye - a_pow, -1, -2), c[..., None])[..., 0]
  return a_bar, b_bar, c_bar


def _s4d_discretise(A, B, log_step, disc):
  if disc not in DISCRETISATIONS:
    raise ValueError(f"disc must be one of {DISCRETISATIONS}; got {disc!r}.")
  step, h = _steps(log_step)
  a, b = _per_channel(A, h, "A"), _per_channel(B, h, "B")
  dt_a = step[:, None] * a  # [h, n]
  if disc == "zoh":
    log_a_bar = dt_a
    b_bar = (jnp.exp(dt_a) - 1.0) / a * b
  else:
    log_a_bar = jnp.log1p(dt_a / 2.0) - jnp.log1p(-dt_a / 2.0)
    b_bar = step[:, None] * b / (1.0 - dt_a / 2.0)
  return log_a_bar, b_bar, h


@functools.partial(jax.jit, static_argnames=("L", "disc", "conj"))
def s4d_kernel(A, B, C, log_step, L: int, disc: str = "zoh", *, conj: bool = True):
  """S4D's Vandermonde kernel: K[l] = (2 if conj else 1) · Re Σ_n C_n B̄_n Ā_n^l.

  Args:
    A: [N'] or [H, N'] complex diagonal (Re < 0).
    B, C: [N'] or [H, N'] complex.
    log_step: [H] log Δ.
    L: kernel length (static).
    disc: "zoh" or "bilinear".
    conj: the states come with implied complex conjugates.

  Returns:
    K [L, H] float32.
  """
  log_a_bar, b_bar, h = _s4d_discretise(A, B, log_step, disc)
  c = _per_channel(C, h, "C")
  # Ā^l = exp(l log Ā): no repeated products, and |Ā^l| <= 1 for Re A < 0.
  powers = jnp.exp(log_a_bar[:, :, None] * jnp.arange(L, dtype=jnp.float32))  # [h, n, l]
  k = jnp.einsum("hn,hnl->lh", c * b_bar, powers).real  # [l, h]
  return (2.0 * k if conj else k).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("disc", "conj"))
def s4d_discrete(A, B, C, log_step, disc: str = "zoh", *, conj: bool = True):
  """S4D as a diagonal recurrence for `seqmix.ops.scan.linear_scan`.

  h_t = Ā ⊙ h_{t-1} + B̄ u_t (per channel, [H, N'] states), y_t = scale · Re Σ_n C_n h_t,n with
  scale 2 under conj symmetry, else 1; the impulse response is `s4d_kernel(...)`.

  Returns:
    (A_bar [H, N'], B_bar [H, N'], C_scaled [H, N']) complex64, C_scaled = scale · C, so that
    y_t = Re Σ_n C_scaled h_t.
  """
  log_a_bar, b_bar, h = _s4d_discretise(A, B, log_step, disc)
  c = _per_channel(C, h, "C")
  return jnp.exp(log_a_bar), b_bar, (2.0 * c if conj else c)
