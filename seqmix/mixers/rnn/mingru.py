"""minGRU (Feng et al., "Were RNNs All We Needed?", arXiv 2024): a GRU whose gate and candidate
depend on the input only, so the recurrence is a parallel linear scan.

    z_t = σ(x_t W_z + b_z),  h̃_t = g(x_t W_h + b_h)          [B, T, W], W = expand·D
    h_t = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ h̃_t                    (seqmix.ops.scan.linear_scan)
    y_t = h_t W_o  (only when W != D; with expand = 1 the layer output is h_t, as the paper)

g(v) = v + ½ for v >= 0, σ(v) for v < 0: the paper's activation that keeps h̃ > 0 so its
log-space scan is defined; the paper applies it in both its sequential and parallel modes, and
so does this mixer (field `candidate_activation`, "g" or "linear"). The paper runs the scan in
log space (a ≥ 0 and h̃ > 0); here `linear_scan` runs it directly, which needs neither and gives
the same h_t. Projections carry biases and PyTorch's default init U(±1/√fan_in), as the paper's
`nn.Linear` layers. h_0 = 0; packed documents reset it (a_t = 0) at document starts.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase
from seqmix.mixers.common import segments
from seqmix.mixers.linear.mamba2 import TORCH_LINEAR_INIT
from seqmix.parallel import axes
from seqmix.parallel import dispatch

CANDIDATE_ACTIVATIONS = ("g", "linear")


class MinRNNCache(NamedTuple):
  """Decoding cache of minGRU / minLSTM."""
  state: jax.Array  # [B, W] float32
  seg: jax.Array    # [B] int32 segment id of the last token seen (-1 before the first)


def g(v):
  """The paper's positive activation: v + ½ for v >= 0, σ(v) below (continuous at 0)."""
  return jnp.where(v >= 0, v + 0.5, jax.nn.sigmoid(v))


def candidate(v, kind: str):
  return g(v) if kind == "g" else v


def check_min_rnn(name: str, expand: int, kind: str):
  """Config checks shared by minGRU / minLSTM."""
  if not isinstance(expand, int) or expand < 1:
    raise ValueError(f"{name}: expand={expand!r} must be an int >= 1 (hidden width "
                     f"expand·d_model).")
  if kind not in CANDIDATE_ACTIVATIONS:
    raise ValueError(f"{name}: candidate_activation={kind!r} is not one of "
                     f"{CANDIDATE_ACTIVATIONS} ('g' is the paper's).")


def torch_bias_init(fan_in: int):
  """PyTorch's nn.Linear bias init: U(±1/√fan_in)."""
  def init(key, shape, dtype=jnp.float32):
    bound = fan_in ** -0.5
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


class MinRNNBase(MixerBase):
  """Shared fields and plumbing of minGRU and minLSTM (subclasses give `_gates`).

  expand: hidden width W = expand·d_model (1: the layer outputs h_t; else W_o maps W -> D).
  candidate_activation: "g" (the paper's) or "linear" for h̃.
  impl, chunk_size: passed to `seqmix.ops.scan.linear_scan`.
  """
  registry_name = "min_rnn"  # the subclass's registry name, for error messages
  expand: int = 1
  candidate_activation: str = "g"
  impl: str = "auto"
  chunk_size: int = 64

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> MinRNNCache:
    del max_len, dtype  # constant-size float32 state
    check_min_rnn(self.registry_name, self.expand, self.candidate_activation)
    return MinRNNCache(jnp.zeros((batch_size, self.expand * self.d_model), jnp.float32),
                       jnp.full((batch_size,), -1, jnp.int32))

  def _dense(self, in_features, features, in_axis, out_axis, name):
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                    kernel_init=axes.param(TORCH_LINEAR_INIT, in_axis, out_axis),
                    bias_init=axes.param(torch_bias_init(in_features), out_axis))

  def _gates(self, x, width):
    """x [B, T, D] -> (a [B, T, W], input [B, T, W]) of h_t = a_t h_{t−1} + input_t."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], MinRNNCache | None)."""
    del positions, deterministic
    check_min_rnn(self.registry_name, self.expand, self.candidate_activation)
    w = self.expand * self.d_model
    b = x.shape[0]
    a, inp = self._gates(x.astype(self.dtype), w)
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    a = segments.reset_decay(a, starts)
    h, state = dispatch.linear_scan(a, inp.astype(self.dtype),
                                    initial_state=None if cache is None else cache.state,
                                    chunk_size=self.chunk_size, impl=self.impl)
    y = h if w == self.d_model else self._dense(w, self.d_model, axes.HEADS, axes.EMBED,
                                                "out_proj")(h)
    new_cache = None if cache is None else MinRNNCache(state,
                                                       segments.last_segment_id(segment_ids, b))
    return y.astype(self.dtype), new_cache


@registry.register(
    "mingru", paper="Were RNNs All We Needed?", year=2024, venue="arXiv", family="linear-rnn",
    op="scan.linear_scan", parents=("gru",), constant_state=True, test_kwargs={},
    url="https://arxiv.org/abs/2410.01201", sequence_parallel=True)
class MinGRU(MinRNNBase):
  """minGRU.  x [B, T, D] -> y [B, T, D]. Fields: see `MinRNNBase`."""
  registry_name = "mingru"

  def _gates(self, x, width):
    zh = self._dense(self.d_model, 2 * width, axes.EMBED, axes.HEADS, "in_proj")(x)
    zh = zh.astype(jnp.float32)
    z, h_tilde = jnp.split(zh, 2, axis=-1)                              # [b, t, w] each
    h_tilde = candidate(h_tilde, self.candidate_activation)
    return jax.nn.sigmoid(-z), jax.nn.sigmoid(z) * h_tilde              # 1 − z_t, z_t h̃_t
