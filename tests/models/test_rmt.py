"""RMT (seqmix.models.rmt) as a segment_recurrent configuration: the memory is the write
tokens' outputs, carries information forward only, truncates with tbptt, resets per document."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmix.models import lm
from seqmix.models import rmt
from seqmix.models import segment_recurrent as sr
from seqmix.testing import assert_rel_close

B, L, N, M = 2, 4, 3, 2


@pytest.fixture(scope="module")
def setup():
  model = rmt.RecurrentMemoryTransformer(vocab_size=16, d_model=32, n_layers=2,
                                         num_memory_tokens=M, mixer="mha",
                                         mixer_kwargs={"mha": {"num_heads": 4}})
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (B, N * L)), jnp.int32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:, :L])["params"])
  run = jax.jit(lambda p, tok, seg=None, tbptt=None: sr.run_segments(
      model, {"params": p}, tok, segment_len=L, segment_ids=seg, tbptt=tbptt),
      static_argnames="tbptt")
  return model, params, tokens, run


def _blocks_direct(model, params, x, ids=None):
  """The stack applied to an explicit [read; segment; write] embedding sequence."""
  cfg = model._config()
  n = x.shape[1]
  pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), x.shape[:2])
  for i in range(model.n_layers):
    blk = lm.Block(mixer_name="mha", mixer_kwargs=cfg.mixer_kwargs["mha"], layer_idx=i,
                   **cfg._block_kwargs(True))
    x, _ = blk.apply({"params": params[f"block_{i}"]}, x, None, ids, pos)
  return x


def test_segments_follow_the_memory_recurrence(setup):
  """Segment n's logits are the stack on [mem_{n-1}; embed; mem_{n-1}] with mem_{n-1} the
  previous write outputs (rebuilt here one segment at a time), mem_0 the learned memory."""
  model, params, tokens, run = setup
  logits, mem = run(params, tokens)
  emb = params["embed"]["embedding"]
  read = jnp.broadcast_to(params["memory"], (B, M, 32))
  for n in range(N):
    x = jnp.concatenate([read, emb[tokens[:, n * L:(n + 1) * L]], read], axis=1)
    h = _blocks_direct(model, params, x)
    hs = h[:, M:M + L]
    hs = hs * jax.lax.rsqrt(jnp.mean(hs * hs, -1, keepdims=True) + 1e-6) * \
        params["norm_final"]["scale"]
    assert_rel_close(logits[:, n * L:(n + 1) * L], hs @ emb.T, 1e-5, f"segment {n}")
    read = h[:, M + L:]
  assert_rel_close(mem.tokens, read, 1e-5, "final memory")


def test_memory_flows_forward_only(setup):
  model, params, tokens, run = setup
  y = np.asarray(run(params, tokens)[0])
  y2 = np.asarray(run(params, tokens.at[:, L:2 * L].set((tokens[:, L:2 * L] + 1) % 16))[0])
  np.testing.assert_array_equal(y[:, :L], y2[:, :L])          # earlier segment unchanged
  assert np.abs(y[:, 2 * L:] - y2[:, 2 * L:]).max() > 1e-4    # a later one sees it


@pytest.mark.slow
def test_tbptt_one_stops_gradients_through_memory(setup):
  model, params, tokens, run = setup
  def memory_grad(tbptt):
    loss = lambda p: jnp.sum(run(p, tokens, tbptt=tbptt)[0][:, 2 * L:] ** 2)
    return jax.jit(jax.grad(loss))(params)["memory"]
  g_full, g_k1 = memory_grad(None), memory_grad(1)
  # The learned mem_0 is read by segment 1 only; it reaches segment 3's loss only through two
  # memory hand-offs, which k=1 cuts and k=None keeps.
  assert np.all(np.asarray(g_k1) == 0)
  assert np.abs(np.asarray(g_full)).max() > 0


def test_document_aligned_to_a_segment_resets_the_memory(setup):
  model, params, tokens, run = setup
  seg = jnp.broadcast_to(jnp.where(jnp.arange(N * L) < L, 1, 2).astype(jnp.int32), (B, N * L))
  y = run(params, tokens, seg)[0]
  alone = run(params, tokens[:, L:], seg[:, L:])[0]
  assert_rel_close(y[:, L:], alone, 1e-5, "doc 2 packed vs alone")


def test_bad_memory_size_raises():
  model = rmt.RecurrentMemoryTransformer(vocab_size=16, d_model=32, n_layers=1,
                                         num_memory_tokens=0)
  with pytest.raises(ValueError, match="num_memory_tokens=0 must be a positive int"):
    model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
