"""TTT-Linear (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden
States", arXiv:2407.04620), the TTT layer of the Transformer backbone, through
`seqmix.ops.ttt.ttt_linear`. `TTTLayerBase` here is the layer shared with TTT-MLP.

    q, k, v = x θ_Q, x θ_K, x θ_V   [B, T, H, K];  q, k rotated by RoPE at position p mod b
    eta_t = base_lr · sigmoid(x_t w_lr + b_lr) / K   [B, T, H]     per-token inner learning rate
    τ_j = max(1/(j+1) + δ_j, 0)                                     learnable per-position scale
    o = TTT(q, k, v, eta, τ; inner LN (γ, β) per head; mini-batch b = 16)    (seqmix.ops.ttt)
    y = W_o [LayerNorm(o) (⊙ gelu_tanh(x W_g) with use_gate)]

as the official ttt-lm-pytorch / ttt-lm-jax `TTTBase`: θ_Q, θ_K, θ_V, W_o N(0, 0.02²) (the
model's `_init_weights`), w_lr N(0, 0.02²) per head, b_lr = 0, δ = 0, inner LN γ = 1, β = 0,
the inner model's initial weights learnable (W N(0, 0.02²), b = 0), post-norm eps 1e-6. The
Mamba-backbone variant (a causal conv before the layer, `pre_conv`) is not built; `use_gate`
adds its output gate. RoPE is rotate-half (`seqmix.positional.rope`; the official code permutes
q/k channels to interleaved pairs — the same maths up to a fixed permutation of θ_Q, θ_K
columns). The RoPE position is the token's position in its inner mini-batch, taken from the
op's own count, so it restarts with every document and continues across decoding calls.

Decoding: the cache holds the op's state (weights at the last mini-batch boundary, the pending
mini-batch's gradient sums and count), so decoding equals the parallel form at any length. An
empty cache (segment id −1) starts from the learned initial weights.

Packed documents: the ttt ops take no reset input, so with `segment_ids` the layer steps
through the sequence one token per op call (a `lax.scan`), putting the learned initial state
back at each document's first token — exact, but sequential (T op calls). Without segment
ids one op call covers the whole input.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.base import MixerBase, check_divisible
from seqmix.mixers.common import segments
from seqmix.mixers.common.norms import LayerNorm
from seqmix.ops import ttt as ttt_ops
from seqmix.parallel import axes
from seqmix.positional.rope import apply_rope

INIT = nn.initializers.normal(0.02)  # the official model's nn.Linear init (initializer_range)


class TTTCache(NamedTuple):
  inner: Any      # ttt_ops.TTTLinearState | ttt_ops.TTTMLPState
  seg: jax.Array  # [B] int32 segment id of the last token seen (-1: nothing seen yet)


class TTTLayerBase(MixerBase):
  """The TTT layer around an inner model (subclasses name the op and its weights).

  num_heads: H; head dim K = D / H (official 125M: 12 heads of 64).
  mini_batch: inner mini-batch size b (16).
  ttt_base_lr: base inner learning rate (paper: 1 for TTT-Linear, 0.1 for TTT-MLP).
  rope_theta: RoPE base (10000).
  use_gate: multiply the post-norm output by gelu_tanh(x W_g) (the Mamba-backbone variant's gate).
  post_norm_eps: eps of the output LayerNorm (1e-6).
  impl: passed to the ttt op.
  """
  num_heads: int = 4
  mini_batch: int = 16
  ttt_base_lr: float = 1.0
  rope_theta: float = 10000.0
  use_gate: bool = False
  post_norm_eps: float = 1e-6
  impl: str = "auto"

  def _head_dim(self):
    check_divisible("d_model", self.d_model, self.num_heads, "num_heads")
    if self.mini_batch < 1:
      raise ValueError(f"{type(self).__name__}: mini_batch={self.mini_batch} must be >= 1 "
                       f"(the paper uses 16).")
    if self.ttt_base_lr <= 0:
      raise ValueError(f"{type(self).__name__}: ttt_base_lr={self.ttt_base_lr} must be > 0 "
                       f"(paper: 1.0 for TTT-Linear, 0.1 for TTT-MLP).")
    return self.d_model // self.num_heads

  # Subclass hooks.
  def _inner_shapes(self, k: int) -> tuple:
    """Shapes of the inner model's weights per head, in the op state's order."""
    raise NotImplementedError

  def _op(self):
    raise NotImplementedError

  def _fresh(self, weights, batch_size):
    raise NotImplementedError

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> TTTCache:
    """Zeros in the op state's layout; the first call replaces them by the learned initial
    weights (the cache's segment id -1 marks it empty), since init_cache has no parameters."""
    del max_len, dtype
    k = self._head_dim()
    zeros = [jnp.zeros((self.num_heads,) + s, jnp.float32) for s in self._inner_shapes(k)]
    return TTTCache(self._fresh(zeros, batch_size), jnp.full((batch_size,), -1, jnp.int32))

  def _rope(self, a, count, t):
    """Rotate a [B, T, H, K] by the position in the inner mini-batch: (count + i) mod b."""
    pos = (count[:, None] + jnp.arange(t, dtype=jnp.int32)[None]) % self.mini_batch  # [b, t]
    return apply_rope(a, pos, base=self.rope_theta)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B, T, D] -> (y [B, T, D], TTTCache | None)."""
    del positions, deterministic
    k_dim = self._head_dim()
    b, t, d = x.shape
    h, mb = self.num_heads, self.mini_batch
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    dense = lambda name, in_axis=axes.EMBED, out_axis=axes.HEADS: nn.Dense(
        d, name=name, kernel_init=axes.param(INIT, in_axis, out_axis), **kw)
    heads = lambda a: a.reshape(b, t, h, k_dim)                          # [b, t, h, k]
    q, k, v = heads(dense("q_proj")(x)), heads(dense("k_proj")(x)), heads(dense("v_proj")(x))

    w_lr = self.param("ttt_lr_weight", axes.param(INIT, axes.HEADS, axes.EMBED), (h, d),
                      self.param_dtype)
    b_lr = self.param("ttt_lr_bias", axes.param(nn.initializers.zeros, axes.HEADS), (h,),
                      self.param_dtype)
    lr_logits = jnp.einsum("btd,hd->bth", x.astype(jnp.float32), w_lr.astype(jnp.float32))
    eta = self.ttt_base_lr * jax.nn.sigmoid(lr_logits + b_lr.astype(jnp.float32)) / k_dim
    token_bias = self.param("learnable_token_idx", axes.param(nn.initializers.zeros, axes.NONE),
                            (mb,), self.param_dtype)
    tau = jnp.maximum(1.0 / jnp.arange(1, mb + 1, dtype=jnp.float32)
                      + token_bias.astype(jnp.float32), 0.0)             # [mb]
    ln_w = self.param("ttt_norm_weight", axes.param(nn.initializers.ones, axes.HEADS, axes.KV),
                      (h, k_dim), self.param_dtype)
    ln_b = self.param("ttt_norm_bias", axes.param(nn.initializers.zeros, axes.HEADS, axes.KV),
                      (h, k_dim), self.param_dtype)
    weights = []
    for name, shape in zip(self._weight_names(), self._inner_shapes(k_dim)):
      init = nn.initializers.zeros if name.startswith("b") else INIT
      weights.append(self.param(name, axes.param(init, axes.HEADS, axes.NONE, axes.NONE),
                                (h,) + shape, self.param_dtype))
    fresh = self._fresh(weights, b)
    op = lambda q_, k_, v_, eta_, state: self._op()(
        q_, k_, v_, eta_, ln_w, ln_b, token_scale=tau, initial_state=state, mini_batch=mb,
        impl=self.impl)

    if cache is None:
      state = fresh
    else:  # an empty cache (seg -1) starts from the learned initial weights
      empty = cache.seg == -1
      state = jax.tree.map(lambda f, c: jnp.where(empty.reshape((b,) + (1,) * (c.ndim - 1)), f, c),
                           fresh, cache.inner)
    starts = segments.segment_starts(segment_ids,
                                     cache_last_id=None if cache is None else cache.seg)
    if starts is None:
      q, k = self._rope(q, state.count, t), self._rope(k, state.count, t)
      o, state = op(q, k, v, eta, state)                                 # [b, t, h, k]
    else:
      def step(st, xs):
        q_t, k_t, v_t, eta_t, start_t = xs                               # [b, h, k], [b]
        st = jax.tree.map(
            lambda f, c: jnp.where(start_t.reshape((b,) + (1,) * (c.ndim - 1)), f, c), fresh, st)
        q_t, k_t = (self._rope(a[:, None], st.count, 1) for a in (q_t, k_t))
        o_t, st = op(q_t, k_t, v_t[:, None], eta_t[:, None], st)         # [b, 1, h, k]
        return st, o_t[:, 0]
      xs = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, eta, starts))  # [t, b, ...]
      state, o = jax.lax.scan(step, state, xs)
      o = jnp.moveaxis(o, 0, 1)                                          # [b, t, h, k]

    o = LayerNorm(eps=self.post_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="post_norm")(o.reshape(b, t, d))                  # [b, t, d]
    if self.use_gate:
      o = jax.nn.gelu(dense("g_proj")(x), approximate=True) * o
    y = dense("o_proj", axes.HEADS, axes.EMBED)(o)
    new_cache = None if cache is None else TTTCache(state, segments.last_segment_id(segment_ids, b))
    return y, new_cache

  def _weight_names(self) -> tuple:
    raise NotImplementedError


@registry.register(
    "ttt_linear", paper="Learning to (Learn at Test Time): RNNs with Expressive Hidden States",
    year=2024, venue="arXiv", family="ttt", op="ttt.ttt_linear", parents=("deltanet",),
    constant_state=True, test_kwargs={"num_heads": 2, "mini_batch": 4},
    url="https://arxiv.org/abs/2407.04620")
class TTTLinear(TTTLayerBase):
  """TTT-Linear layer: the inner model is f(x) = x + LN(x W + b) per head.  x [B, T, D].

  Fields as `TTTLayerBase` (ttt_base_lr 1.0); the inner W [H, K, K], b [H, 1, K] at the start of
  a sequence are parameters.
  """

  def _weight_names(self):
    return ("W1", "b1")

  def _inner_shapes(self, k):
    return ((k, k), (1, k))

  def _op(self):
    return ttt_ops.ttt_linear

  def _fresh(self, weights, batch_size):
    return ttt_ops.linear_state(*weights, batch_size)
