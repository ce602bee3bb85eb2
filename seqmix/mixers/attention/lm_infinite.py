"""LM-Infinite (Han et al., NAACL 2024, "LM-Infinite: Zero-Shot Extreme Length Generalization
for Large Language Models"): a Λ-shaped attention mask (the first n_global tokens plus a local
window of W) and a distance ceiling L.

For a query at position i and a key at j ≤ i (same document), visible iff j < n_global or
i − j < W:

    local  (i − j < W):                  logit = q_i R(i) · k_j R(j) / sqrt(Dh)
    global (j < n_global, i − j >= W):   logit = q_i R(min(L, i)) · k_j R(0) / sqrt(Dh)
    o_i = Σ_visible softmax_j(logit_ij) v_j

i.e. a far global token is seen at the distance limit (the released code rotates the
"stationary" query by min(L, kv_len − 1) and leaves those keys unrotated; during decoding
kv_len − 1 = i). L defaults to W (as the code's `convert_llama_model`). Keys are cached twice
(rotated at j and unrotated); the two parts are `blockwise_attention` calls merged by
log-sum-exp; the cache is bounded (n_global sink slots + a ring of W, `SinkWindowAttention`).
Shapes: x [B,T,D] -> y [B,T,D].

Not reproduced: the optional top-k middle-token selection and the triangle offset of the
released code, and the paper's evaluations of pretrained models.
"""

import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.attention.remapped import SinkWindowAttention


@registry.register(
    "lm_infinite",
    paper="LM-Infinite: Zero-Shot Extreme Length Generalization for Large Language Models",
    year=2024, venue="NAACL", family="attention",
    op="attention.blockwise_attention x2 + lse merge", parents=("mha",), constant_state=True,
    test_kwargs={"num_heads": 4, "num_kv_heads": 2, "num_global": 2, "local_window": 4,
                 "distance_limit": 5},
    url="https://arxiv.org/abs/2308.16137")
class LMInfinite(SinkWindowAttention):
  """Λ-shaped mask + distance ceiling (module docstring); every MHA field except `window`.

  num_global: n_global >= 0 starting tokens always visible (the paper uses 10).
  local_window: W >= 1 (the paper: the pretraining length).
  distance_limit: L >= 1 (None: W), the distance the global tokens are seen at.
  """
  num_global: int = 10
  local_window: int = 4096
  distance_limit: int | None = None

  def _check(self):
    if self.num_global < 0:
      raise ValueError(f"LMInfinite: num_global={self.num_global} must be >= 0.")
    if self.local_window < 1:
      raise ValueError(f"LMInfinite: local_window={self.local_window} must be >= 1.")
    if self.distance_limit is not None and self.distance_limit < 1:
      raise ValueError(f"LMInfinite: distance_limit={self.distance_limit} must be >= 1 or "
                       "None (= local_window).")
    return super()._check()

  def num_sinks(self):
    return self.num_global

  def recent(self):
    return self.local_window

  def key_positions(self, pos):
    return (pos, jnp.zeros_like(pos))

  def parts(self, q_pos, k_pos):
    w = self.local_window
    limit = self.distance_limit or w
    near = (q_pos[:, :, None] - k_pos[:, None, :]) < w                  # [b, t, s]
    far_global = (k_pos[:, None, :] < self.num_global) & ~near
    return ((q_pos, 0, near), (jnp.minimum(q_pos, limit), 1, far_global))
