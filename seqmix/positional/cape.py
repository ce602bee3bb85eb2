"""CAPE / DAPE (Zheng et al. 2024, "DAPE: Data-Adaptive Positional Encoding for Length
Extrapolation"; the method was first released as CAPE, context-adaptive PE)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.parallel import axes
from seqmix.positional import base as registry
from seqmix.positional.base import PositionalComponent, register, scaled_logits


@register("cape", paper="DAPE: Data-Adaptive Positional Encoding for Length Extrapolation",
          year=2024, venue="NeurIPS", url="https://arxiv.org/abs/2405.14722",
          parents=("kerple_log", "alibi", "fire"))
class CAPE(PositionalComponent):
  """CAPE (DAPE): a static positional bias B corrected by an MLP of the logits and B,

      A_ij = Dh^−½ q_i·k_j  (all H heads),  B_ij = the base component's bias [H]
      bias_ij = B_ij + f([A_ij ; B_ij]),   f: 2H -> `mlp_width` (LeakyReLU 0.01) -> H

  applied per (query, key) pair, mixing heads (the reference code's `mlp2`). The softmax
  then sees A + B + f(A, B). B is `base_position` ("kerple_log" by default, DAPE's main
  setting; any content-free bias component, or "none" for B = 0). f reads the logits, so
  the bias needs the [T, S] logits explicitly (no online softmax); decoding computes it
  for the cached keys only.
  """
  base_position: str = "kerple_log"
  mlp_width: int = 32

  BIAS = True
  CONTENT = True

  def setup(self):
    info = registry.get(self.base_position)
    if self.base_position not in ("none", "nope") and (not info.cls.BIAS or info.cls.CONTENT
                                                       or info.cls.ROTATES):
      raise ValueError(f"cape: base_position={self.base_position!r} must be a content-free "
                       f"bias component (e.g. 'kerple_log', 'alibi', 'fire', 't5') or 'none'.")
    self.base_bias = (info.cls(num_heads=self.num_heads, head_dim=self.head_dim)
                      if info.cls.BIAS else None)
    dense = lambda n, ax_in, ax_out, name: nn.Dense(
        n, name=name, kernel_init=axes.param(nn.initializers.lecun_normal(), ax_in, ax_out),
        bias_init=axes.param(nn.initializers.zeros, ax_out))
    self.mlp_in = dense(self.mlp_width, axes.HEADS, axes.MLP, "mlp_in")
    self.mlp_out = dense(self.num_heads, axes.MLP, axes.HEADS, "mlp_out")

  def bias(self, q, k, q_pos, k_pos, *, k_idx=None, visible=None):
    a = scaled_logits(q, k, self.num_heads)                          # [b, h, t, s]
    if self.base_bias is None:
      b = jnp.zeros_like(a)
    else:
      b = jnp.broadcast_to(self.base_bias.bias(q, k, q_pos, k_pos, k_idx=k_idx,
                                               visible=visible), a.shape)
    feats = jnp.moveaxis(jnp.concatenate([a, b], axis=1), 1, -1)     # [b, t, s, 2h]
    f = self.mlp_out(jax.nn.leaky_relu(self.mlp_in(feats), 0.01))   # [b, t, s, h]
    return b + jnp.moveaxis(f, -1, 1)
