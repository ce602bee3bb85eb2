"""Synthesizer (Tay et al., "Synthesizer: Rethinking Self-Attention for Transformer Models",
ICML 2021): attention weights synthesized without query-key products, made causal by masking.

    Dense:  logits[h, t, s] = F_h(x_t)[pos_s],  F(x) = W_2 relu(W_1 x + b_1) + b_2   [B,T,H,L]
    Random: logits[h, t, s] = R[h, pos_t, pos_s],  R [H, L, L] learned
    o_t = Σ_{s≤t, same doc} softmax_s(logits[h, t, ·]) v_s,   v = x W_v           [B,T,H,Dh]
    y = o W_o                                                                     [B,T,D]

(paper section 3.1, eq. 2-5; "Random" is its trainable Random Synthesizer). L = max_len: the
Dense synthesizer emits one logit per key position, the Random one holds an [L, L] table per
head, so neither runs past max_len. Positions (restarting per packed document) index them.
The softmax, causal and segment masks and empty rows are `seqmix.ops.attention` with zero
queries and keys (q·k = 0) and the synthesized logits as its additive bias.

Dense has no position information of its own: a token's row scores key *positions*, but the
token does not know its own position, so it cannot ask for "two tokens back"
(registry `needs_positions`). Random's table is indexed by both positions and needs none.

Decoding keeps every past token's value (`common.dense_mixing.PastCache`, growing): the
synthesized logits of a new token are computed from it alone (Dense) or read from the table
(Random), over the cached positions.
"""

import flax.linen as nn
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import dense_mixing
from seqmix.ops import attention as attention_op
from seqmix.parallel import axes

_MASKED = -1e30   # finite mask logit (as mha's decoding): every query sees itself


class _Synthesizer(MixerBase):
  """Shared fields of the synthesizers.

  num_heads: H (d_model % H == 0; head width d_model // H).
  max_len: L, the number of key positions the synthesized logits cover; sequences and caches
    longer than L are refused, positions outside [0, L) give NaN.
  impl: `seqmix.ops.attention.attention` impl; the impl named here is the impl run.
  """
  num_heads: int = 4
  max_len: int = 1024
  impl: str = "auto"

  def _dims(self):
    if self.num_heads < 1:
      raise ValueError(f"{self._label}: num_heads={self.num_heads} must be >= 1.")
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    if self.max_len < 1:
      raise ValueError(f"{self._label}: max_len={self.max_len} must be >= 1.")
    return self.num_heads, self.d_model // self.num_heads

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32):
    """Growing cache of values [B, max_len, H, Dh] for max_len <= self.max_len tokens."""
    h, dh = self._dims()
    dense_mixing.check_max_len(self._label, "init_cache max_len", max_len, self.max_len)
    return dense_mixing.init_past_cache(batch_size, max_len, (h, dh), dtype)

  def _logits(self, x, pos_q, pos_k):
    """x [B,T,D], pos_q [B,T], pos_k [B,S] -> float32 logits [B,H,T,S]."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], PastCache | None). positions [B,T] index the logits (default:
    the token's place in the stream); segment_ids [B,T]: packed documents."""
    del deterministic
    h, dh = self._dims()
    b, t, _ = x.shape
    if cache is None:
      dense_mixing.check_max_len(self._label, "sequence length T", t, self.max_len)
    x = x.astype(self.dtype)
    v = nn.DenseGeneral((h, dh), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED,
                                               axes.HEADS, axes.KV), name="v_proj")(x)
    index, positions = dense_mixing.token_index(cache, b, t, positions)
    seg = dense_mixing.segments_or_zeros(segment_ids, b, t)
    v_all, pos_k, visible = dense_mixing.with_past(cache, v, index, positions, seg)
    logits = self._logits(x, positions, pos_k)                         # [b, h, t, s]
    # q·k = 0, so logits = bias (q and k as wide as v: the xla impl wants one head width).
    zq = jnp.zeros((b, t, h, dh), self.dtype)
    zk = jnp.zeros((b, v_all.shape[1], h, dh), self.dtype)
    if cache is None:
      o, _ = attention_op.attention(zq, zk, v_all, causal=True, scale=1.0,
                                    segment_ids=segment_ids, bias=logits, impl=self.impl)
      new_cache = None
    else:
      logits = jnp.where(visible[:, None], logits, _MASKED)
      o, _ = attention_op.attention(zq, zk, v_all, causal=False, scale=1.0, bias=logits,
                                    impl=self.impl)
      new_cache = dense_mixing.write(cache, v, index, positions, seg)
    y = nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        kernel_init=axes.param(nn.initializers.lecun_normal(), axes.HEADS,
                                               axes.KV, axes.EMBED), name="o_proj")(o)
    return y, new_cache


@registry.register(
    "synthesizer_dense", paper="Synthesizer: Rethinking Self-Attention for Transformer Models",
    year=2020, venue="ICML", family="mlp-mixer", op="attention.attention", parents=("mha",),
    constant_state=False, test_kwargs={"num_heads": 4, "max_len": 64},
    url="https://arxiv.org/abs/2005.00743", needs_positions=True)
class DenseSynthesizer(_Synthesizer):
  """Causal Dense Synthesizer.  x [B,T,D] -> y [B,T,D].

  hidden_dim: width of F's hidden layer (None: d_model, as the paper's W_1 [D, D]).
  """
  hidden_dim: int | None = None
  _label = "synthesizer_dense"

  def _logits(self, x, pos_q, pos_k):
    del pos_q
    h, _ = self._dims()
    hid = self.hidden_dim or self.d_model
    if hid < 1:
      raise ValueError(f"synthesizer_dense: hidden_dim={self.hidden_dim} must be >= 1 (or None "
                       f"for d_model).")
    z = nn.Dense(hid, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED, axes.MLP),
                 bias_init=axes.param(nn.initializers.zeros, axes.MLP), name="w1")(x)
    rows = nn.DenseGeneral((h, self.max_len), dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=axes.param(nn.initializers.lecun_normal(), axes.MLP,
                                                  axes.HEADS, axes.NONE),
                           bias_init=axes.param(nn.initializers.zeros, axes.HEADS, axes.NONE),
                           name="w2")(nn.relu(z))                      # [b, t, h, L]
    return dense_mixing.rows_at(rows.astype(jnp.float32), pos_k)       # [b, h, t, s]


@registry.register(
    "synthesizer_random", paper="Synthesizer: Rethinking Self-Attention for Transformer Models",
    year=2020, venue="ICML", family="mlp-mixer", op="attention.attention", parents=("mha",),
    constant_state=False, test_kwargs={"num_heads": 4, "max_len": 64},
    url="https://arxiv.org/abs/2005.00743")
class RandomSynthesizer(_Synthesizer):
  """Causal (trainable) Random Synthesizer.  x [B,T,D] -> y [B,T,D].

  init_std: standard deviation of the N(0, σ²) init of R [H, L, L].
  """
  init_std: float = 0.02
  _label = "synthesizer_random"

  def _logits(self, x, pos_q, pos_k):
    del x
    h, _ = self._dims()
    r = self.param("random_logits",
                   axes.param(nn.initializers.normal(self.init_std), axes.HEADS, axes.NONE,
                              axes.NONE), (h, self.max_len, self.max_len), self.param_dtype)
    return dense_mixing.table_at(r.astype(jnp.float32), pos_q, pos_k)  # [b, h, t, s]
