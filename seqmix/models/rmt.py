"""RMT, the Recurrent Memory Transformer (Bulatov et al., NeurIPS 2022), decoder-only form:
m memory tokens read at the start of every segment and written at its end, carried from
segment to segment, as a `seqmix.models.segment_recurrent` configuration.

    x^(n)     = [mem_{n−1}; embed(tokens^(n)); mem_{n−1}]                    [B, m + L + m, D]
    h^(n)     = blocks(x^(n))   (the LanguageModel's blocks; positions arange(m + L + m))
    logits^(n) = head(norm(h^(n)[m : m + L]))
    mem_n     = h^(n)[m + L :]   (the write tokens' outputs; mem_0 = a learned [m, D])

Every segment is one parallel forward of the whole stack (the memory tokens pass through
all layers), so the memory `RMTMemory` (the m write states, the last document id and the
token count) is the model's cache: `run_segments(rmt, variables, tokens, segment_len=L,
tbptt=k)` trains it with backpropagation through k segments (the paper's BPTT over
segments). With cache=None a call is one segment from mem_0.

Packed documents: a segment whose first token starts a new document (a different id from
the last token seen, or the first call) reads mem_0 instead of the carried memory. The
memory tokens carry the first token's document id (read) and the last token's (write), and
the mixers keep documents apart inside a segment, so documents aligned to segment starts are
processed exactly as alone; a document that starts inside a segment sees no memory tokens
until the next segment (the paper packs no documents).
"""

from typing import Any, NamedTuple
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix.mixers.common import norms
from seqmix.models import embed as embed_lib
from seqmix.models import lm
from seqmix.parallel import axes


class RMTMemory(NamedTuple):
  tokens: jax.Array  # [B, m, D] the last segment's write-token states
  seg: jax.Array     # [B] int32 document id of the last token seen
  length: jax.Array  # [B] int32 tokens seen (0: read the learned initial memory)


class RecurrentMemoryTransformer(nn.Module):
  """Decoder-only RMT over any registered mixer stack.  tokens [B, L] -> logits [B, L, Vo].

  vocab_size, d_model, n_layers, mixer, mixer_kwargs, mlp, norm: as `LanguageModel`.
  num_memory_tokens: m >= 1.
  """
  vocab_size: int
  d_model: int
  n_layers: int
  num_memory_tokens: int = 8
  mixer: str = "mha"
  mixer_kwargs: Any = dataclasses.field(default_factory=dict)
  mlp: str = "swiglu"
  norm: str = "rmsnorm"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _config(self) -> lm.LanguageModel:
    if not isinstance(self.num_memory_tokens, int) or self.num_memory_tokens < 1:
      raise ValueError(f"num_memory_tokens={self.num_memory_tokens!r} must be a positive int.")
    return lm.LanguageModel(vocab_size=self.vocab_size, d_model=self.d_model,
                            n_layers=self.n_layers, mixer=self.mixer,
                            mixer_kwargs=self.mixer_kwargs, mlp=self.mlp, norm=self.norm,
                            dtype=self.dtype, param_dtype=self.param_dtype, parent=None)

  def init_cache(self, batch_size: int, max_len: int = 0, dtype=jnp.float32) -> RMTMemory:
    """No memory yet (the first segment reads the learned initial memory)."""
    self._config()
    m = self.num_memory_tokens
    return RMTMemory(tokens=jnp.zeros((batch_size, m, self.d_model), dtype),
                     seg=jnp.full((batch_size,), -1, jnp.int32),
                     length=jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, tokens, *, segment_ids=None, positions=None, cache=None,
               deterministic: bool = True):
    """tokens [B, L] -> (logits [B, L, Vo] float32, RMTMemory | None).

    positions are not used: every segment is a fresh sequence [memory; segment; memory] with
    positions arange(m + L + m), as the paper feeds it.
    """
    cfg = self._config()
    names = cfg.layer_mixers()
    m = self.num_memory_tokens
    b, t = tokens.shape
    embed = embed_lib.Embed(self.vocab_size, self.d_model,
                     embedding_init=axes.param(nn.initializers.normal(cfg.embed_init_scale),
                                               axes.VOCAB, axes.EMBED),
                     dtype=self.dtype, param_dtype=self.param_dtype, name="embed")
    mem0 = self.param("memory", nn.initializers.normal(cfg.embed_init_scale),
                      (m, self.d_model), self.param_dtype)
    seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    read = jnp.broadcast_to(mem0.astype(self.dtype), (b, m, self.d_model))
    if cache is not None:
      fresh = (cache.length == 0) | (cache.seg != seg[:, 0])            # [b]
      read = jnp.where(fresh[:, None, None], read, cache.tokens.astype(self.dtype))
    x = jnp.concatenate([read, embed(tokens), read], axis=1)             # [b, m + t + m, d]
    ids = jnp.concatenate([jnp.repeat(seg[:, :1], m, axis=1), seg,
                           jnp.repeat(seg[:, -1:], m, axis=1)], axis=1)
    n = x.shape[1]
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    kw = cfg._block_kwargs(deterministic)  # pylint: disable=protected-access
    for i, name in enumerate(names):
      x, _ = lm.Block(mixer_name=name, mixer_kwargs=cfg.mixer_kwargs.get(name, {}),
                      layer_idx=i, name=f"block_{i}", **kw)(
                          x, None, None if segment_ids is None else ids, pos)
    h = norms.make_norm(self.norm, eps=cfg.norm_eps, use_bias=cfg.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="norm_final")(x[:, m:m + t])
    logits = embed.attend(h).astype(jnp.float32)
    if cache is None:
      return logits, None
    return logits, RMTMemory(tokens=x[:, m + t:].astype(cache.tokens.dtype), seg=seg[:, -1],
                             length=cache.length + t)
