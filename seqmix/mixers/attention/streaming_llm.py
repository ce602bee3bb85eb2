"""StreamingLLM attention sinks (Xiao et al., ICLR 2024, "Efficient Streaming Language Models
with Attention Sinks"): the KV cache keeps the first S tokens (the sinks) and the last W
tokens, and RoPE positions are taken within the cache.

For a query at position i and a key at j ≤ i (same document), visible iff j < S or i − j < W.
With positions within the cache, the cache of a query at i ≥ S + W − 1 is [sinks 0..S−1,
recent tokens at S..S+W−1] and the query sits at S + W − 1, so

    recent key (i − j < W):       distance i − j          (query at i, key at j)
    sink key   (j < S, i − j ≥ W): distance min(i, S+W−1) − j   (query at min(i, S+W−1))
    o_i = Σ_visible softmax_j(q_i R(p_q) · k_j R(j) / sqrt(Dh)) v_j

(before the cache fills, i < S + W − 1, nothing is evicted and positions are the original
ones, which the min gives). Keys are cached rotated at their own position; the two parts are
`blockwise_attention` calls merged by log-sum-exp (`seqmix.mixers.attention.remapped`); the
cache is bounded: S sink slots + a ring of W (`SinkWindowAttention`). The parallel form is the
same attention with the Λ-shaped mask, so decode == parallel at any length.
Shapes: x [B,T,D] -> y [B,T,D].

Not reproduced: the paper's pretrained-model streaming evaluations and its learnable sink
token pre-training variant.
"""

import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.attention.remapped import SinkWindowAttention


@registry.register(
    "streaming_llm", paper="Efficient Streaming Language Models with Attention Sinks",
    year=2024, venue="ICLR", family="attention",
    op="attention.blockwise_attention x2 + lse merge", parents=("mha",), constant_state=True,
    test_kwargs={"num_heads": 4, "num_kv_heads": 2, "num_sink_tokens": 2, "recent_window": 4},
    url="https://arxiv.org/abs/2309.17453")
class StreamingLLM(SinkWindowAttention):
  """Attention sinks + recent window with in-cache positions (module docstring); every MHA
  field except `window`.

  num_sink_tokens: S >= 0 (the paper uses 4).
  recent_window: W >= 1, the recent tokens kept, the current one included.
  """
  num_sink_tokens: int = 4
  recent_window: int = 1020

  def _check(self):
    if self.num_sink_tokens < 0:
      raise ValueError(f"StreamingLLM: num_sink_tokens={self.num_sink_tokens} must be >= 0.")
    if self.recent_window < 1:
      raise ValueError(f"StreamingLLM: recent_window={self.recent_window} must be >= 1 (the "
                       "current token is always kept).")
    return super()._check()

  def num_sinks(self):
    return self.num_sink_tokens

  def recent(self):
    return self.recent_window

  def key_positions(self, pos):
    return (pos,)

  def parts(self, q_pos, k_pos):
    s, w = self.num_sink_tokens, self.recent_window
    near = (q_pos[:, :, None] - k_pos[:, None, :]) < w                  # [b, t, s]
    sink = (k_pos[:, None, :] < s) & ~near
    return ((q_pos, 0, near), (jnp.minimum(q_pos, s + w - 1), 0, sink))
