"""CoPE (Golovneva et al. 2024, "Contextual Position Encoding: Learning to Count What's
Important")."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.parallel import axes
from seqmix.positional.base import PositionalComponent, register, scaled_logits


def suffix_sum(gates, k_idx=None):
  """p[..., j] = Σ_{t : idx_t ≥ idx_j} gates[..., t] over the key axis (the last).

  gates [B,H,T,S] (zero where a key is not visible); k_idx [B,S] each key's token index
  (None: keys are in token order). Keys in any slot order (a ring-buffer cache) are sorted
  by index first, so the sum runs from key j up to the query whatever the slot layout.
  """
  if k_idx is None:
    return jnp.flip(jnp.cumsum(jnp.flip(gates, -1), -1), -1)
  order = jnp.argsort(k_idx, axis=-1)[:, None, None, :]            # [b, 1, 1, s]
  g = jnp.take_along_axis(gates, order, axis=-1)
  p = jnp.flip(jnp.cumsum(jnp.flip(g, -1), -1), -1)
  return jnp.take_along_axis(p, jnp.argsort(order, axis=-1), axis=-1)


@register("cope", paper="Contextual Position Encoding: Learning to Count What's Important",
          year=2024, venue="arXiv", url="https://arxiv.org/abs/2405.18719", parents=("t5",))
class CoPE(PositionalComponent):
  """CoPE: positions counted by the content, p_ij = Σ_{t=j}^{i} σ(a_it) over visible t,

      a_it = Dh^−½ q_i·k_t (the attention logit),  p_ij ∈ [0, i − j + 1]
      p̄ = min(p_ij, P − 1),  e[p̄] = (⌈p̄⌉ − p̄)·e[⌊p̄⌋] + (p̄ − ⌊p̄⌋)·e[⌈p̄⌉]   (e[n] = q_i·E[:, n])
      b_h(i, j) = e[p̄] = q_i · ((1 − w) E[:, ⌊p̄⌋] + w E[:, ⌈p̄⌉]),  w = p̄ − ⌊p̄⌋

  E [Dh, P] learned, shared by the heads (P = `npos_max`, 64; init zeros as in the paper's
  code, so CoPE starts as NoPE). Gates are per query head (GQA keys repeated). The bias
  reads q and the visible keys only: decoding computes it for the cached keys (each slot's
  gate, summed in token order); absolute positions never enter, so any offset is the same.
  """
  npos_max: int = 64

  BIAS = True
  CONTENT = True

  def setup(self):
    if self.npos_max < 2:
      raise ValueError(f"cope: npos_max={self.npos_max} must be >= 2 (positions counted up "
                       "to npos_max − 1; the paper uses tens).")
    self.pos_emb = self.param("pos_emb", axes.param(nn.initializers.zeros, axes.KV, axes.NONE),
                              (self.head_dim, self.npos_max), jnp.float32)

  def bias(self, q, k, q_pos, k_pos, *, k_idx=None, visible=None):
    del q_pos, k_pos
    if visible is None:
      raise ValueError("cope: bias needs the visibility mask (CONTENT component).")
    gates = jnp.where(visible[:, None], jax.nn.sigmoid(scaled_logits(q, k, self.num_heads)),
                      0.0)                                           # [b, h, t, s]
    p = jnp.minimum(suffix_sum(gates, k_idx), self.npos_max - 1)
    lo = jnp.floor(p)
    w = p - lo
    lo = lo.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, self.npos_max - 1)
    e = jnp.einsum("bthd,dn->bhtn", q.astype(jnp.float32), self.pos_emb)   # [b, h, t, P]
    e_lo = jnp.take_along_axis(e, lo, axis=-1)
    e_hi = jnp.take_along_axis(e, hi, axis=-1)
    return (1.0 - w) * e_lo + w * e_hi
