"""NoPE (Kazemnejad et al. 2023) and NoPE with a per-head temperature (Wang et al. 2024)."""

import flax.linen as nn
import jax.numpy as jnp

from seqmix.parallel import axes
from seqmix.positional.base import PositionalComponent, register


@register("nope", paper="The Impact of Positional Encoding on Length Generalization in "
          "Transformers", year=2023, venue="NeurIPS", url="https://arxiv.org/abs/2305.19466",
          parents=("none",))
class NoPE(PositionalComponent):
  """NoPE: no positional encoding, logits = Dh^−½ q·k (identical to position="none"); a
  causal decoder still knows order through its mask (the paper shows it can represent
  absolute and relative positions)."""


@register("nope_temperature", paper="Length Generalization of Causal Transformers without "
          "Position Encoding", year=2024, venue="ACL Findings",
          url="https://arxiv.org/abs/2404.12224", parents=("nope",))
class NoPETemperature(PositionalComponent):
  """NoPE with a learned per-head attention temperature:

      logits_h = λ_h · Dh^−½ q_h·k,   λ_h > 0 learned (init 1), applied as q_h <- λ_h q_h

  The paper searches λ_h per head at inference to extend the context (attention of NoPE
  heads spreads out past the training length; a larger λ_h sharpens it). Here λ_h is a
  parameter (`temperature`, [H]) that training or a search may set; keys are untouched so
  the cache needs nothing new.
  """
  ROTATES = True

  def setup(self):
    self.temperature = self.param("temperature", axes.param(nn.initializers.ones, axes.HEADS),
                                  (self.num_heads,), jnp.float32)

  def rotate(self, q, k, positions):
    del positions
    return (q.astype(jnp.float32) * self.temperature[:, None]).astype(q.dtype), k
