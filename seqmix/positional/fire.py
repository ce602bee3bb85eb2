"""FIRE (Li et al. 2024, "Functional Interpolation for Relative Positions Improves Long
Context Transformers")."""

import flax.linen as nn
import jax.numpy as jnp

from seqmix.parallel import axes
from seqmix.positional.base import PositionalComponent, register, relative_distance


@register("fire", paper="Functional Interpolation for Relative Positions Improves Long Context "
          "Transformers", year=2024, venue="ICLR", url="https://arxiv.org/abs/2310.04418",
          parents=("t5", "kerple_log"))
class FIRE(PositionalComponent):
  """FIRE: b(i, j) = f_θ( ψ(p_i − p_j) / ψ(max(L, p_i)) ),  ψ(x) = log(|c x| + 1),

  f_θ: an MLP 1 -> `mlp_width` (ReLU) -> H (one bias per head); c learned (init `init_c`);
  L = |λ| · `init_L` the learned threshold of progressive interpolation (λ init 1): for
  queries past L the distance is normalised by the query position, so every normalised
  distance stays in [0, 1] at any length. ψ(max(L, p_i)) gets + `eps` (the paper's 1e-6).
  Positions are the caller's (restarted per document when packed).
  """
  mlp_width: int = 32
  init_c: float = 0.1
  init_L: float = 512.0
  eps: float = 1e-6

  BIAS = True

  def setup(self):
    self.hidden = nn.Dense(self.mlp_width, name="mlp_in",
                           kernel_init=axes.param(nn.initializers.lecun_normal(), axes.NONE,
                                                  axes.MLP),
                           bias_init=axes.param(nn.initializers.zeros, axes.MLP))
    self.out = nn.Dense(self.num_heads, name="mlp_out",
                        kernel_init=axes.param(nn.initializers.lecun_normal(), axes.MLP,
                                               axes.HEADS),
                        bias_init=axes.param(nn.initializers.zeros, axes.HEADS))
    self.c = self.param("c", axes.param(nn.initializers.constant(self.init_c)), (), jnp.float32)
    self.L_multiplier = self.param("L_multiplier", axes.param(nn.initializers.ones), (),
                                   jnp.float32)

  def bias(self, q, k, q_pos, k_pos, *, k_idx=None, visible=None):
    del q, k, k_idx, visible
    psi = lambda x: jnp.log(jnp.abs(self.c * x) + 1.0)
    dist = relative_distance(q_pos, k_pos)[:, 0]                     # [b, t, s]
    threshold = jnp.abs(self.L_multiplier * self.init_L)
    norm = psi(jnp.maximum(q_pos.astype(jnp.float32), threshold)) + self.eps   # [b, t]
    u = (psi(dist) / norm[:, :, None])[..., None]                    # [b, t, s, 1]
    b = self.out(nn.relu(self.hidden(u)))                            # [b, t, s, h]
    return jnp.moveaxis(b, -1, 1).astype(jnp.float32)                # [b, h, t, s]
