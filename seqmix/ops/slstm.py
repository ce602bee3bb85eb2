"""xLSTM's sLSTM cell: exponential input gate, normaliser and stabiliser, head-wise recurrence.

    slstm(x_gates, R, bias, *, initial_state=None, forget_gate="sigmoid", impl="auto")
        -> (h, SLSTMState(c, n, m, h))

Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", eqs. 8-17, as the official vanilla
cell computes them. Per head, with pre-activations of the gates g in (z, i, f, o)

    raw_g,t = x_gates[:, t, g] + h_{t-1} R[g] + bias[g]     (R[g] block-diagonal: one [Dh, Dh]
                                                             matrix per head, `h R`, row vector)
    log f_t = log σ(raw_f) ("sigmoid", the official default) or raw_f ("exp")
    m_t = max(log f_t + m_{t-1}, raw_i)                      (= raw_i where n_{t-1} = 0: empty)
    i'_t = exp(raw_i - m_t),  f'_t = exp(log f_t + m_{t-1} - m_t)
    c_t = f'_t c_{t-1} + i'_t tanh(raw_z),   n_t = f'_t n_{t-1} + i'_t
    h_t = σ(raw_o) c_t / n_t

`c, n` are the paper's cell and normaliser scaled by e^{-m}; `h` does not depend on the
stabiliser. The gate order along axis 2 is (z, i, f, o) — the official code packs (i, f, z, o),
so a port permutes its weights. An empty state is all zeros: where `n = 0` the stabiliser
restarts at raw_i (the official cell does this for an all-zero state), so the first step gives
n = 1 and h never divides by zero.

Impls: only `reference` (a token-by-token `lax.scan` in float32). The recurrence goes through
non-linearities of h_{t-1}, so there is no parallel (chunked or associative) form; `pallas`
(a fused kernel keeping R on chip, as the official CUDA kernel does) is not built. `auto` is
`reference`.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from seqmix.ops._impl import resolve

IMPLS = {"reference": True, "pallas": False}
AUTO = {"default": "reference"}
GATES = ("z", "i", "f", "o")


class SLSTMState(NamedTuple):
  """sLSTM state; each field [B, H, Dh] float32 (c, n scaled by e^{-m})."""
  c: jax.Array
  n: jax.Array
  m: jax.Array
  h: jax.Array


def empty_state(batch: int, heads: int, head_dim: int) -> SLSTMState:
  zeros = jnp.zeros((batch, heads, head_dim), jnp.float32)
  return SLSTMState(zeros, zeros, zeros, zeros)


def _step(R, bias, log_forget, state, x_t):
  """One token: x_t [b, 4, h, dh] pre-activations -> (new state, h_t [b, h, dh])."""
  c, n, m, h = state
  raw = x_t + jnp.einsum("bhd,ghde->bghe", h, R) + bias  # [b, 4, h, dh]
  z_raw, i_raw, f_raw, o_raw = (raw[:, g] for g in range(4))
  log_f = log_forget(f_raw)
  m_new = jnp.where(n == 0.0, i_raw, jnp.maximum(log_f + m, i_raw))
  i_gate = jnp.exp(i_raw - m_new)
  f_gate = jnp.exp(log_f + m - m_new)
  c_new = f_gate * c + i_gate * jnp.tanh(z_raw)
  n_new = f_gate * n + i_gate
  h_new = jax.nn.sigmoid(o_raw) * c_new / n_new
  return SLSTMState(c_new, n_new, m_new, h_new), h_new


@functools.partial(jax.jit, static_argnames=("forget_gate", "impl"))
def slstm(x_gates, R, bias=None, *, initial_state=None, forget_gate: str = "sigmoid",
          impl: str = "auto"):
  """The sLSTM recurrence (module docstring) over time.

  Args:
    x_gates: [B, T, 4, H, Dh] gate pre-activations from the input projection, gates (z, i, f, o).
    R: [4, H, Dh, Dh] recurrent weights per gate and head (h_{t-1} [Dh] times R[g, head]).
    bias: [4, H, Dh] gate biases, or None.
    initial_state: SLSTMState (or tuple (c, n, m, h)) of [B, H, Dh] arrays; empty if None.
    forget_gate: "sigmoid" (log f = log σ(raw_f); official default) or "exp" (log f = raw_f).
    impl: "reference" | "auto" ("pallas" is not built).

  Returns:
    (h [B, T, H, Dh] in x_gates' dtype, SLSTMState of [B, H, Dh] float32).
  """
  impl = resolve("slstm", impl, IMPLS, AUTO)
  if x_gates.ndim != 5 or x_gates.shape[2] != 4:
    raise ValueError(f"slstm: x_gates must be [B, T, 4, H, Dh] (gates z, i, f, o); got "
                     f"{x_gates.shape=}.")
  b, t, _, nh, dh = x_gates.shape
  if R.shape != (4, nh, dh, dh):
    raise ValueError(f"slstm: R must be [4, H, Dh, Dh] = {(4, nh, dh, dh)}; got {R.shape=}.")
  if bias is not None and bias.shape != (4, nh, dh):
    raise ValueError(f"slstm: bias must be [4, H, Dh] = {(4, nh, dh)}; got {bias.shape=}.")
  if forget_gate == "sigmoid":
    log_forget = jax.nn.log_sigmoid
  elif forget_gate == "exp":
    log_forget = lambda f: f
  else:
    raise ValueError(f"slstm: forget_gate must be 'sigmoid' or 'exp'; got {forget_gate!r}.")
  f32 = jnp.float32
  if initial_state is None:
    state = empty_state(b, nh, dh)
  else:
    state = SLSTMState(*(jnp.asarray(s, f32) for s in initial_state))
    if any(s.shape != (b, nh, dh) for s in state):
      raise ValueError(f"slstm: initial_state fields must be [B, H, Dh] = {(b, nh, dh)}; got "
                       f"{[s.shape for s in state]}.")
  bias32 = jnp.zeros((4, nh, dh), f32) if bias is None else bias.astype(f32)
  step = functools.partial(_step, R.astype(f32), bias32, log_forget)
  state, h = lax.scan(step, state, jnp.moveaxis(x_gates.astype(f32), 1, 0))  # [t, b, h, dh]
  return jnp.moveaxis(h, 0, 1).astype(x_gates.dtype), state
