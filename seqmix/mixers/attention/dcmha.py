"""DCMHA: dynamically composable multi-head attention (Xiao, Meng, Li & Yuan, ICML 2024,
"Improving Transformers with Dynamically Composable Multi-Head Attention"), causal.

Each head's attention scores are mixed with the other heads' scores, once on the logits
(before the softmax, "pre") and once on the probabilities (after it, "post"), by H x H matrices
that depend on the query token i and on the key token j:

    q, k, v = x W_q, x W_k, x W_v                        [B,T,H,Dh]  (RoPE, QK-norm as `mha`)
    s_g(i,j) = Dh^-1/2 q_g(i)·k_g(j)                     raw logits of head g
    for c in {pre, post}, from the token's input x_t [D]:
      hid   = GELU(x_t W1_c)                             [4, C]   (C = dyn_hidden, default 4H)
      a, b  = hid W2_c                                   [R, H] each (rank R; a RMS-normalised
                                                                  over heads, no scale)
      d     = tanh(x_t Wd_c)                             [H]
      M_c(t) = aᵀ b + diag(d)                            [H, H]   (query-wise from x_i, key-wise
                                                                  from x_j: separate weights)
      C_c(i,j) = I + S_c + Mq_c(i) + Mk_c(j)             S_c: static [H,H] (init 0)
    l_h(i,j) = Σ_g s_g(i,j) C_pre(i,j)[g,h]              composed logits (causal mask after)
    P_h(i,·) = softmax_{j ≤ i} l_h(i,·)
    o_h(i)   = Σ_{j ≤ i} Σ_g P_g(i,j) C_post(i,j)[g,h] v_h(j)
    y = o W_o

This is the composition of the paper's Eqs. (composition with low-rank query-/key-wise
dynamic projections plus query-/key-wise gating and the static W_b), with the layout of the
authors' reference code: one x-dependent MLP produces both ranks' weights, w1 is RMS-normalised
over heads, the gates are tanh, the identity is added (so zero dynamic weights give MHA).

Computed without any [T, T] tensor. Because C(i,j) is a sum of a query-only and a key-only
part, the composed logit is an ordinary dot product of expanded vectors:

    l_h(i,j) = Dh^-1/2 Σ_g (Qpre_gh(i) q_g(i))·k_g(j) + q_g(i)·(Kpre_gh(j) k_g(j))
             = Dh^-1/2 q'_h(i)·k'_h(j),   q'_h = [Qpre_gh q_g, q_g]_g,  k'_h = [k_g, Kpre_gh k_g]_g

(Q = I + S + Mq, K = Mk), and the post composition moves onto values and outputs:

    o_h(i) = Σ_g Qpost_gh(i) (P_g V_h)(i) + (P_g [Kpost_gh V_h])(i)

so head g attends with values v'_g(j) = [v_h(j), Kpost_gh(j) v_h(j)]_h. One call of
`seqmix.ops.attention.attention` with q', k', v' of width 2·H·Dh per head is exactly DCMHA
(memory O(T·H²·Dh) instead of O(T²·H)); decoding is `mha`'s KV cache holding k', v' (the
key-side weights depend on the key token only). x [B,T,D] -> y [B,T,D].

Not reproduced: the paper's grouped composition (groups of heads), its chunked-query
training kernel and the local/global window schedule of DCFormer (use `window` per layer);
GQA (composition is over query heads, so num_kv_heads must equal num_heads).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqmix import registry
from seqmix.mixers.attention.mha import MHA, MHACache
from seqmix.mixers.common.norms import RMSNorm
from seqmix.parallel import axes
from seqmix.parallel import dispatch
from seqmix.positional import rope

# Order of the four dynamic weight sets: (pre, post) x (query-wise, key-wise).
PRE_Q, PRE_K, POST_Q, POST_K = range(4)


def _rms(a, eps=1e-6):
  """RMS normalisation over the last axis (no learned scale)."""
  a32 = a.astype(jnp.float32)
  return (a32 * jax.lax.rsqrt(jnp.mean(a32 * a32, -1, keepdims=True) + eps)).astype(a.dtype)


@registry.register(
    "dcmha", paper="Improving Transformers with Dynamically Composable Multi-Head Attention",
    year=2024, venue="ICML", family="attention", op="attention.attention", parents=("mha",),
    constant_state=False, test_kwargs={"num_heads": 4, "rank": 2},
    url="https://arxiv.org/abs/2405.08553")
class DCMHA(MHA):
  """Multi-head attention with dynamic cross-head composition of logits and probabilities
  (module docstring). The MHA fields apply except: num_kv_heads must be None (or num_heads),
  position must be "rope" or "none", attn_dropout must be 0.

  rank: R, the rank of each dynamic query-/key-wise composition matrix (paper: 2).
  dyn_hidden: C, the width of the MLP producing the dynamic weights (None: 4·num_heads, as the
    paper).
  """
  rank: int = 2
  dyn_hidden: int | None = None

  def _dims(self):
    h, g, dh = super()._dims()
    if g != h:
      raise ValueError(f"dcmha: num_kv_heads={self.num_kv_heads} but the composition mixes "
                       f"query heads with their own keys; use num_kv_heads=None ({h}).")
    if self.position not in ("rope", "none"):
      raise ValueError(f"dcmha: position={self.position!r}; use 'rope' or 'none'.")
    if self.attn_dropout:
      raise ValueError(f"dcmha: attn_dropout={self.attn_dropout} is not supported; set 0.")
    if self.rank < 1:
      raise ValueError(f"dcmha: rank={self.rank} must be >= 1.")
    return h, g, dh

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> MHACache:
    """KV cache of the expanded keys / values k', v' [B, S, H, 2·H·Dh]."""
    h, _, dh = self._dims()
    s = max_len if self.window is None else min(self.window, max_len)
    wide = (batch_size, s, h, 2 * h * dh)
    return MHACache(k=jnp.zeros(wide, dtype), v=jnp.zeros(wide, dtype),
                    idx=jnp.full((batch_size, s), -1, jnp.int32),
                    pos=jnp.zeros((batch_size, s), jnp.int32),
                    seg=jnp.zeros((batch_size, s), jnp.int32),
                    length=jnp.zeros((batch_size,), jnp.int32))

  def _compositions(self, x, h):
    """Per-token composition matrices  x [B,T,D] -> Q_pre, K_pre, Q_post, K_post [B,T,H,H]
    (the identity and the static part are in the query-wise ones)."""
    c = self.dyn_hidden or 4 * h
    r = self.rank
    f32 = jnp.float32
    w1 = self.param("dyn_w1", axes.param(nn.initializers.lecun_normal(), axes.EMBED, None,
                                         axes.MLP), (self.d_model, 4, c), self.param_dtype)
    # Zero init (as the reference code): the layer starts as plain MHA.
    w2 = self.param("dyn_w2", axes.param(nn.initializers.zeros, None, axes.MLP, None,
                                         axes.HEADS), (4, c, 2 * r, h), self.param_dtype)
    wd = self.param("dyn_dd", axes.param(nn.initializers.zeros, axes.EMBED, None, axes.HEADS),
                    (self.d_model, 4, h), self.param_dtype)
    static = self.param("static_w", axes.param(nn.initializers.zeros, None, axes.HEADS,
                                               axes.HEADS), (2, h, h), self.param_dtype)
    x = x.astype(f32)
    hid = jax.nn.gelu(jnp.einsum("btd,dnc->btnc", x, w1.astype(f32)), approximate=False)
    ab = jnp.einsum("btnc,ncrh->btnrh", hid, w2.astype(f32))       # [b, t, 4, 2r, h]
    a, bb = _rms(ab[..., :r, :]), ab[..., r:, :]                     # [b, t, 4, r, h]
    d = jnp.tanh(jnp.einsum("btd,dnh->btnh", x, wd.astype(f32)))     # [b, t, 4, h]
    m = jnp.einsum("btnrg,btnrh->btngh", a, bb)                      # [b, t, 4, h, h]
    m = m + d[..., :, None] * jnp.eye(h, dtype=f32)
    eye_static = jnp.eye(h, dtype=f32) + static.astype(f32)          # [2, h, h]
    q_pre = m[:, :, PRE_Q] + eye_static[0]
    q_post = m[:, :, POST_Q] + eye_static[1]
    return q_pre, m[:, :, PRE_K], q_post, m[:, :, POST_K]

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
    """x [B,T,D] -> (y [B,T,D], MHACache | None); arguments as `mha`."""
    h, _, dh = self._dims()
    b, t, _ = x.shape
    x = x.astype(self.dtype)

    def proj_in(name):
      return nn.DenseGeneral((h, dh), use_bias=self.use_bias, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name,
                             kernel_init=axes.param(nn.initializers.lecun_normal(), axes.EMBED,
                                                    axes.HEADS, axes.KV),
                             bias_init=axes.param(nn.initializers.zeros, axes.HEADS, axes.KV))

    q, k, v = proj_in("q_proj")(x), proj_in("k_proj")(x), proj_in("v_proj")(x)  # [b, t, h, dh]
    if self.qk_norm:
      norm = lambda name: RMSNorm(axis_name=axes.KV, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=name)
      q, k = norm("q_norm")(q), norm("k_norm")(k)
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.length
    index = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]     # [b, t] token index
    positions = index if positions is None else positions.astype(jnp.int32)
    if self.position == "rope":
      rot = dict(base=self.rope_base, fraction=self.rope_fraction, rope_scaling=self.rope_scaling)
      q, k = rope.apply_rope(q, positions, **rot), rope.apply_rope(k, positions, **rot)

    q_pre, k_pre, q_post, k_post = self._compositions(x, h)          # [b, t, h(g), h]
    dt = q.dtype
    # The op's default scale is (2·H·Dh)^-1/2; the logit scale is Dh^-1/2: fold the ratio in q'.
    qs = q * jnp.asarray(math.sqrt(2 * h), dt)
    q_wide = jnp.concatenate([jnp.einsum("btgh,btgk->bthgk", q_pre.astype(dt), qs),
                              jnp.broadcast_to(qs[:, :, None], (b, t, h, h, dh))], axis=-1)
    k_wide = jnp.concatenate([jnp.broadcast_to(k[:, :, None], (b, t, h, h, dh)),
                              jnp.einsum("btgh,btgk->bthgk", k_pre.astype(dt), k)], axis=-1)
    # v'_g = [v_h, Kpost_gh v_h]_h: index [b, t, g, h, 2, dh].
    v_wide = jnp.stack([jnp.broadcast_to(v[:, :, None], (b, t, h, h, dh)),
                        jnp.einsum("btgh,bthk->btghk", k_post.astype(dt), v)], axis=-2)
    q_wide = q_wide.reshape(b, t, h, 2 * h * dh)                     # [b, t, h, (g 2dh)]
    k_wide = k_wide.reshape(b, t, h, 2 * h * dh)
    v_wide = v_wide.reshape(b, t, h, 2 * h * dh)                     # [b, t, g, (h 2 dh)]

    if cache is None:
      o_wide, _ = dispatch.attention(q_wide, k_wide, v_wide, causal=True, window=self.window,
                                     segment_ids=segment_ids, impl=self.impl)
      new_cache = None
    else:
      o_wide, new_cache = self._decode(q_wide, k_wide, v_wide, index, positions, segment_ids,
                                       cache, None)
    o_wide = o_wide.reshape(b, t, h, h, 2, dh)                       # [b, t, g, h, 2, dh]
    o = (jnp.einsum("btgh,btghk->bthk", q_post.astype(o_wide.dtype), o_wide[..., 0, :])
         + o_wide[..., 1, :].sum(axis=2))                            # [b, t, h, dh]
    return self._out(o, deterministic), new_cache
