"""sLSTM layer (Beck et al., "xLSTM: Extended Long Short-Term Memory", NeurIPS 2024), as the
official `sLSTMLayer` of the post-up-projection sLSTM block.

    c = swish(Conv1D_4(x))                          (conv_kernel = 0: c = x)
    i, f = headwise(c W_i), headwise(c W_f);  z, o = headwise(x W_z), headwise(x W_o)
    h = sLSTM(z, i, f, o; R block-diagonal per head)           (seqmix.ops.slstm.slstm)
    y = GroupNorm_heads(h)                                      [B, T, D]

`headwise` is a block-diagonal linear map (one [Dh, Dh] matrix per head, the official
`LinearHeadwiseExpand`), Dh = D / H. There is no output projection: in the paper's sLSTM block
the gated MLP (up-projection factor 4/3, GeLU) follows this layer, and in seqmix that MLP is
the model's (`mlp=...` of the block), so this mixer is the block without it.

Init as the official code: gate input weights N(0, 2 / (5 D)) ("small init"), recurrent weights
R = 0, biases 0 except the forget gate's "powerlaw_blockdependent" bias per head,
  b_f[j] = 5 − 12 (j / (Dh − 1))^(0.3 + 1.3 r0),   r0 = layer_idx / (n_layers − 1),
the conv as the shared `ShortConv` (PyTorch's default init, as the official `CausalConv1d`),
the group norm a per-head LayerNorm without bias, scale 1.

Decoding keeps the conv's last K−1 inputs and the cell state (c, n, m, h) [B, H, Dh] float32.

Packed documents: the conv masks taps across starts; the cell state must be emptied at a start,
and since the recurrence feeds h_{t−1} through R, no gate value passed to the op can do it.
With `segment_ids` the mixer therefore runs the op one token at a time inside a `lax.scan`,
emptying (c, n, m, h) at starts: exact, and no slower than the op's only form (`reference`,
itself a token-by-token scan). A `reset` argument on the op would remove this path.
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.norms import LayerNorm
from seqmix.mixers.common.short_conv import ShortConv, ShortConvCache
from seqmix.ops import slstm as slstm_ops
from seqmix.parallel import axes

FORGET_GATES = ("sigmoid", "exp")


class SLSTMCache(NamedTuple):
  conv: Optional[ShortConvCache]  # the conv's last K−1 inputs and ids (None: no conv)
  cell: slstm_ops.SLSTMState      # (c, n, m, h), each [B, H, Dh] float32
  seg: jax.Array                  # [B] int32 segment id of the last token seen (-1: none)


def forget_bias_init(head_dim: int, layer_idx: int, n_layers: int):
  """[Dh] official "powerlaw_blockdependent" forget bias: 5 − 12 (j/(Dh−1))^(0.3 + 1.3 r0)."""
  r0 = layer_idx / (n_layers - 1) if n_layers > 1 else 0.0
  j = jnp.arange(head_dim, dtype=jnp.float32) / max(head_dim - 1, 1)
  return 5.0 - 12.0 * j ** (0.3 + 1.3 * r0)


@registry.register(
    "slstm", paper="xLSTM: Extended Long Short-Term Memory", year=2024, venue="NeurIPS",
    family="nonlinear-rnn", op="slstm.slstm", parents=("lstm",), constant_state=True,
    test_kwargs={"num_heads": 4}, url="https://arxiv.org/abs/2405.04517")
class SLSTM(MixerBase):
  """sLSTM layer.  x [B, T, D] -> y [B, T, D].

  num_heads: H; each head has its own block of recurrent weights (D % H == 0; official 4).
  conv_kernel: taps of the causal conv + swish feeding the i and f gates (official 4; 0: none).
  forget_gate: "sigmoid" (official) or "exp", passed to the op.
  norm_eps: epsilon of the per-head group norm.
  impl: `seqmix.ops.slstm.slstm` impl ("reference" | "auto"); conv_impl: the conv's impl.
  """
  num_heads: int = 4
  conv_kernel: int = 4
  forget_gate: str = "sigmoid"
  norm_eps: float = 1e-5
  impl: str = "auto"
  conv_impl: str = "auto"

  def _head_dim(self) -> int:
    if self.num_heads < 1:
      raise ValueError(f"slstm: num_heads={self.num_heads} must be >= 1.")
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    if self.conv_kernel < 0:
      raise ValueError(f"slstm: conv_kernel={self.conv_kernel} must be >= 0 (official 4; 0 "
                       "turns the conv off).")
    if self.forget_gate not in FORGET_GATES:
      raise ValueError(f"slstm: forget_gate={self.forget_gate!r} is not one of {FORGET_GATES}.")
    if not 0 <= self.layer_idx < max(self.n_layers, 1):
      raise ValueError(f"slstm: layer_idx={self.layer_idx} must be in [0, n_layers="
                       f"{self.n_layers}); the forget-gate init depends on depth.")
    return self.d_model // self.num_heads

  def _conv(self):
    return ShortConv(self.d_model, kernel_size=self.conv_kernel, activation="silu",
                     impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="conv")

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> SLSTMCache:
    del max_len  # constant-size state
    dh = self._head_dim()
    conv = None
    if self.conv_kernel > 0:
      conv = ShortConvCache(jnp.zeros((batch_size, self.conv_kernel - 1, self.d_model), dtype),
                            jnp.full((batch_size, self.conv_kernel - 1), -1, jnp.int32))
    return SLSTMCache(conv, slstm_ops.empty_state(batch_size, self.num_heads, dh),
                      jnp.full((batch_size,), -1, jnp.int32))

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], SLSTMCache | None). segment_ids [B,T]: packed documents."""
    del positions, deterministic
    dh = self._head_dim()
    nh = self.num_heads
    b, t, d = x.shape
    x = x.astype(self.dtype)

    conv_cache = None
    if self.conv_kernel > 0:
      xc, conv_cache = self._conv()(x, segment_ids=segment_ids,
                                    cache=None if cache is None else cache.conv)
    else:
      xc = x

    small = nn.initializers.normal((2.0 / (5.0 * d)) ** 0.5)
    w_if = self.param("w_if", axes.param(small, None, axes.HEADS, None, axes.KV),
                      (2, nh, dh, dh), self.param_dtype)
    w_zo = self.param("w_zo", axes.param(small, None, axes.HEADS, None, axes.KV),
                      (2, nh, dh, dh), self.param_dtype)
    r = self.param("recurrent", axes.param(nn.initializers.zeros, None, axes.HEADS, None,
                                           axes.KV), (4, nh, dh, dh), self.param_dtype)
    f_bias = forget_bias_init(dh, self.layer_idx, self.n_layers)

    def bias_init(key, shape, dtype=jnp.float32):
      del key
      return jnp.zeros(shape, dtype).at[2].set(jnp.broadcast_to(f_bias, shape[1:]).astype(dtype))

    bias = self.param("bias", axes.param(bias_init, None, axes.HEADS, axes.KV), (4, nh, dh),
                      self.param_dtype)

    heads = lambda u: u.reshape(b, t, nh, dh)                      # [b, t, h, dh]
    g_if = jnp.einsum("bthd,ghde->btghe", heads(xc), w_if.astype(self.dtype))  # [b, t, 2, h, dh]
    g_zo = jnp.einsum("bthd,ghde->btghe", heads(x), w_zo.astype(self.dtype))
    # [b, t, 4, h, dh] in the op's gate order (z, i, f, o)
    gates = jnp.concatenate([g_zo[:, :, :1], g_if, g_zo[:, :, 1:]], axis=2)

    state = None if cache is None else cache.cell
    last_id = None if cache is None else cache.seg
    starts = segments.segment_starts(segment_ids, cache_last_id=last_id)   # [b, t] | None
    if starts is None:
      hs, state = slstm_ops.slstm(gates, r, bias, initial_state=state,
                                  forget_gate=self.forget_gate, impl=self.impl)
    else:
      hs, state = self._slstm_with_resets(gates, r, bias, state, starts)

    # Group norm: a LayerNorm per head over its Dh channels, a learned scale per channel.
    normed = LayerNorm(eps=self.norm_eps, use_bias=False, use_scale=False, dtype=self.dtype,
                       name="group_norm")(hs)                     # [b, t, h, dh]
    scale = self.param("norm_scale", axes.param(nn.initializers.ones, axes.HEADS, axes.KV),
                       (nh, dh), self.param_dtype)
    y = (normed * scale.astype(self.dtype)).reshape(b, t, d)        # [b, t, d]
    new_cache = None
    if cache is not None:
      new_cache = SLSTMCache(conv_cache, state, segments.last_segment_id(segment_ids, b))
    return y, new_cache

  def _slstm_with_resets(self, gates, r, bias, state, starts):
    """The op one token at a time, its state emptied where `starts` [B,T] is True.

    gates [B,T,4,H,Dh] -> (h [B,T,H,Dh], SLSTMState).
    """
    b, _, _, nh, dh = gates.shape
    empty = slstm_ops.empty_state(b, nh, dh)
    state = empty if state is None else slstm_ops.SLSTMState(*state)

    def step(s, inp):
      g_t, start = inp                                               # [b, 4, h, dh], [b]
      s = slstm_ops.SLSTMState(*(jnp.where(start[:, None, None], e, f) for e, f in zip(empty, s)))
      h, s = slstm_ops.slstm(g_t[:, None], r, bias, initial_state=s,
                             forget_gate=self.forget_gate, impl=self.impl)
      return s, h[:, 0]

    state, hs = lax.scan(step, state, (jnp.moveaxis(gates, 1, 0), jnp.moveaxis(starts, 1, 0)))
    return jnp.moveaxis(hs, 0, 1), state                             # [b, t, h, dh]
