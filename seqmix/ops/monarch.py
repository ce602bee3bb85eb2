"""The DFT as a Monarch product (Fu et al., "Monarch Mixer", NeurIPS 2023; Dao et al.,
"Monarch: Expressive Structured Matrices for Efficient and Accurate Training", ICML 2022).

For n = n1·n2 (here powers of two, n1 = 2^⌊log2(n)/2⌋), the DFT matrix F_n (F[k, j] = ω^{jk},
ω = e^{-2πi/n}) factors into two block-diagonal matrices, a diagonal and permutations
(Cooley–Tukey's four-step form):

    F_n = P_out R Tw L P_in,  L = I_{n2} ⊗ F_{n1},  R = (I_{n1} ⊗ F_{n2}) P_mid,
    Tw diagonal, P_in, P_mid, P_out permutations (`monarch_factors`); index-wise:

    j = n2·j1 + j2,  k = k1 + n1·k2 (j1, k1 < n1; j2, k2 < n2):
    X[k1 + n1·k2] = Σ_{j2} ω_{n2}^{j2 k2} · ω_n^{j2 k1} · Σ_{j1} ω_{n1}^{j1 k1} x[n2·j1 + j2]

i.e. reshape x to [n1, n2], multiply by F_{n1} on the left (n2 blocks of size n1), scale by the
twiddles ω_n^{j2 k1}, multiply by F_{n2} on the right (n1 blocks of size n2), read out
transposed. Both block-diagonal products are dense matmuls (O(n^{3/2}) work: what M2 runs on
matrix units in place of an FFT). `monarch_factors` gives the explicit matrices for tests.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def split_size(n: int) -> tuple[int, int]:
  """(n1, n2) with n1·n2 = n, n1 = 2^⌊log2(n)/2⌋ (n a power of two)."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"monarch: n={n} must be a power of two.")
  n1 = 1 << (int(math.log2(n)) // 2)
  return n1, n // n1


def _dft_matrix(m: int) -> np.ndarray:
  j = np.arange(m)
  return np.exp(-2j * np.pi * np.outer(j, j) / m)


def monarch_dft(x, axis: int = 1):
  """X = F_n x along `axis` (length n, a power of two), complex64, via the Monarch product."""
  x = jnp.moveaxis(x.astype(jnp.complex64), axis, -1)               # [..., n]
  n = x.shape[-1]
  n1, n2 = split_size(n)
  f1 = jnp.asarray(_dft_matrix(n1), jnp.complex64)
  f2 = jnp.asarray(_dft_matrix(n2), jnp.complex64)
  tw = jnp.asarray(np.exp(-2j * np.pi * np.outer(np.arange(n1), np.arange(n2)) / n),
                   jnp.complex64)                                    # [k1, j2]
  a = x.reshape(x.shape[:-1] + (n1, n2))                             # a[j1, j2] = x[n2·j1 + j2]
  b = jnp.einsum("kj,...jm->...km", f1, a, precision=_HIGHEST)       # [.., k1, j2]
  d = jnp.einsum("...km,ml->...kl", b * tw, f2, precision=_HIGHEST)  # [.., k1, k2]
  out = jnp.swapaxes(d, -1, -2).reshape(x.shape)                     # X[k1 + n1·k2]
  return jnp.moveaxis(out, -1, axis)


def monarch_idft(y, axis: int = 1):
  """F_n^{-1} y = conj(F_n conj(y)) / n along `axis`."""
  n = y.shape[axis]
  return jnp.conj(monarch_dft(jnp.conj(y.astype(jnp.complex64)), axis)) / n


def monarch_factors(n: int):
  """(P_in, L, Tw, R, P_out) as dense numpy matrices with F_n = P_out R Tw L P_in.

  P_in: x -> the [n1, n2] grid read column-major (j2 slow), so L = I_{n2} ⊗ F_{n1} acts on each
  column; Tw diagonal twiddles; P_mid, folded into R: regroup by k1; R = I_{n1} ⊗ F_{n2};
  P_out: (k1, k2) -> k1 + n1·k2. For tests of the factorisation (O(n²) memory).
  """
  n1, n2 = split_size(n)
  p_in = np.zeros((n, n))
  for j1 in range(n1):
    for j2 in range(n2):
      p_in[j2 * n1 + j1, n2 * j1 + j2] = 1                           # row (j2, j1)
  left = np.kron(np.eye(n2), _dft_matrix(n1))                        # per j2: F_{n1} over j1
  tw = np.diag([np.exp(-2j * np.pi * j2 * k1 / n) for j2 in range(n2) for k1 in range(n1)])
  regroup = np.zeros((n, n))
  for k1 in range(n1):
    for j2 in range(n2):
      regroup[k1 * n2 + j2, j2 * n1 + k1] = 1                        # (j2, k1) -> (k1, j2)
  right = np.kron(np.eye(n1), _dft_matrix(n2)) @ regroup             # per k1: F_{n2} over j2
  p_out = np.zeros((n, n))
  for k1 in range(n1):
    for k2 in range(n2):
      p_out[k1 + n1 * k2, k1 * n2 + k2] = 1
  return p_in, left, tw, right, p_out
