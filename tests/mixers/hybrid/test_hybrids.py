"""The hybrid layer patterns (samba, jamba, mamba2_hybrid, zamba): the layer lists their papers
give (written out by hand), the configured attention members against a float64 formula, and one
training step of a small model of each pattern. The shared protocol checks run each pattern as
a `PatternStack` in tests/mixers/test_protocol.py. The training steps run under `slow`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqmix import registry
from seqmix.mixers import testing as mt
from seqmix.mixers.hybrid import jamba, mamba2_hybrid, samba, zamba
from seqmix.models import lm
from seqmix.testing import RTOL, assert_rel_close

D, V = 32, 19


def _swa_oracle(x, p, *, num_heads, num_kv_heads, window, rope=True, base=10000.0):
  """Sliding-window causal softmax attention in float64, written from the paper's equation.

  x [B,T,D]; p: q/k/v_proj kernels [D, H|G, Dh], o_proj [H, Dh, D]. Query t of head i sees keys
  s with t − W < s ≤ t of kv head i // (H/G); RoPE rotate-half on every channel.
  """
  b, t, _ = x.shape
  q = np.einsum("btd,dhk->bthk", x, p["q_proj"]["kernel"])
  k = np.einsum("btd,dhk->bthk", x, p["k_proj"]["kernel"])
  v = np.einsum("btd,dhk->bthk", x, p["v_proj"]["kernel"])
  dh = q.shape[-1]
  if rope:
    theta = base ** (-np.arange(0, dh, 2) / dh)
    ang = np.arange(t)[:, None, None] * theta                        # [t, 1, dh/2]

    def rot(a):
      a1, a2 = a[..., :dh // 2], a[..., dh // 2:]
      return np.concatenate([a1 * np.cos(ang) - a2 * np.sin(ang),
                             a2 * np.cos(ang) + a1 * np.sin(ang)], -1)
    q, k = rot(q), rot(k)
  o = np.zeros(q.shape)
  for bi in range(b):
    for i in range(num_heads):
      g = i // (num_heads // num_kv_heads)
      for tq in range(t):
        keys = list(range(max(0, tq - window + 1), tq + 1))
        logits = np.array([q[bi, tq, i] @ k[bi, s, g] for s in keys]) / np.sqrt(dh)
        w = np.exp(logits - logits.max())
        o[bi, tq, i] = (w / w.sum()) @ v[bi, keys, g]
  return np.einsum("bthk,hkd->btd", o, p["o_proj"]["kernel"])


def _check_member_formula(mod, *, num_heads, num_kv_heads, window, rope=True, t=20):
  x = mt.random_inputs(0, 2, t, D)
  params = mt.init_params(mod, x)
  y, _ = jax.jit(lambda p_, x_: mod.apply({"params": p_}, x_))(params, x)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want = _swa_oracle(np.asarray(x, np.float64), p64, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, window=window, rope=rope)
  assert_rel_close(y, want, RTOL["float32"], f"{type(mod).__name__} vs formula")


def _model(mixer, n_layers, mlp="swiglu", **kw):
  members = {registry.base_name(m) for m in registry.expand_pattern(mixer, n_layers)}
  kwargs = {m: dict(registry.get(m).test_kwargs) for m in members}
  return lm.LanguageModel(vocab_size=V, d_model=D, n_layers=n_layers, mixer=mixer,
                          mixer_kwargs=kwargs, mlp=mlp, max_len=32, **kw)


def _tokens(seed=0, b=2, t=9):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def _check_trains_a_step(model):
  """One Adam step on a batch: finite loss, a nonzero gradient for every parameter leaf, and
  a lower loss on the same batch after the step (one compiled function)."""
  tokens = _tokens()
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  opt = optax.adam(1e-2)

  def loss(p):
    logits = model.apply({"params": p}, tokens[:, :-1])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(p):
    l0, g = jax.value_and_grad(loss)(p)
    upd, _ = opt.update(g, opt.init(p), p)
    return l0, g, loss(optax.apply_updates(p, upd))

  l0, g, l1 = step(params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
    leaf = np.asarray(leaf)
    assert np.all(np.isfinite(leaf)), jax.tree_util.keystr(path)
    assert np.any(leaf != 0), f"no gradient reaches {jax.tree_util.keystr(path)}"
  assert np.isfinite(float(l0)) and float(l1) < float(l0), (float(l0), float(l1))
  return params


# Samba.


def test_samba_layers_are_mamba_then_swa():
  assert registry.get("samba").pattern == ("mamba", "samba_swa")
  assert registry.expand_pattern("samba", 6) == ["mamba", "samba_swa"] * 3
  assert registry.expand_pattern("samba", 3) == ["mamba", "samba_swa", "mamba"]
  info = registry.get("samba")
  assert info.family == "hybrid" and set(info.parents) == {"mamba", "samba_swa"}
  assert info.constant_state is False  # the SWA ring buffer: W slots per attention layer


def test_samba_swa_defaults_and_window_error():
  m = samba.SambaSWA(d_model=D)
  assert (m.window, m.num_kv_heads, m.rope_fraction, m.position) == (2048, None, 1.0, "rope")
  assert m.init_cache(2, 100).k.shape == (2, 100, m.num_heads, D // m.num_heads)
  assert m.init_cache(2, 5000).k.shape[1] == 2048      # a ring of `window` slots
  with pytest.raises(ValueError, match="samba_swa: window=None"):
    samba.SambaSWA(d_model=D, window=None).init_cache(1, 4)


def test_samba_swa_equals_sliding_window_formula():
  """T = 20 over a window of 4: every query past the fourth drops keys."""
  _check_member_formula(samba.SambaSWA(d_model=D, num_heads=4, window=4), num_heads=4,
                        num_kv_heads=4, window=4)


@pytest.mark.slow  # ~15 s of CPU each (Mamba's scan under grad); the protocol grads are default
def test_samba_model_trains_a_step():
  _check_trains_a_step(_model("samba", 2))


# Jamba.


def test_jamba_layers_are_one_attention_in_eight():
  m, a = "mamba", "jamba_attention"
  assert registry.get("jamba").pattern == (m, m, m, m, a, m, m, m)
  assert registry.expand_pattern("jamba", 16) == [m, m, m, m, a, m, m, m] * 2
  assert registry.expand_pattern("jamba", 6) == [m, m, m, m, a, m]
  assert registry.get("jamba").constant_state is False


def test_jamba_attention_defaults():
  m = jamba.JambaAttention(d_model=256)
  assert (m.num_heads, m.num_kv_heads, m.position, m.window) == (32, 8, "none", None)
  assert m.init_cache(1, 10).k.shape == (1, 10, 8, 8)     # full KV cache, 8 kv heads
  assert registry.get("jamba_attention").needs_positions


def test_jamba_attention_equals_nope_gqa_formula():
  """No RoPE: a window larger than T makes the oracle plain causal attention."""
  _check_member_formula(jamba.JambaAttention(d_model=D, num_heads=4, num_kv_heads=2),
                        num_heads=4, num_kv_heads=2, window=10**6, rope=False)


@pytest.mark.slow
def test_jamba_model_trains_a_step():
  _check_trains_a_step(_model("jamba", 5))


# Mamba-2-Hybrid.


def test_mamba2_hybrid_places_attention_by_depth():
  """Attention indices written out from the rule by hand (mamba2_hybrid docstring)."""
  def attn(n):
    return [i for i, m in enumerate(registry.expand_pattern("mamba2_hybrid", n))
            if m == "jamba_attention"]
  # The paper's 56-layer model = 28 blocks: 4 attention mixers (7% of 56 layers).
  assert attn(28) == [5, 11, 16, 22]
  assert attn(12) == [3, 8]                # round(0.08·24) = 2; sections of 10/3 layers
  assert attn(8) == [4] and attn(4) == [2]  # min 1; round(0.64) = 1
  assert attn(2) == [1]                     # round(0.32) = 0 -> at least one
  layers = registry.expand_pattern("mamba2_hybrid", 28)
  assert set(layers) == {"mamba2", "jamba_attention"} and len(layers) == 28
  assert layers[0] == layers[-1] == "mamba2"
  assert registry.get("mamba2_hybrid").pattern == ("mamba2",) * 3 + ("jamba_attention",) + (
      "mamba2",) * 3


def test_mamba2_hybrid_must_be_the_whole_spec():
  with pytest.raises(ValueError, match="places its layers by the depth"):
    registry.expand_pattern("gla,mamba2_hybrid", 8)
  with pytest.raises(ValueError, match="n_layers=0"):
    mamba2_hybrid.layout(0)


def test_register_pattern_checks_the_layout_members():
  registry.names()
  with pytest.raises(ValueError, match=r"layout\(1\) gives \['mha'\]"):
    registry.register_pattern("test_only_layout", ("gla",), paper="t", year=2024, venue="t",
                              op="none", layout=lambda n: ("mha",) * n)
  assert "test_only_layout" not in registry.names()


@pytest.mark.slow
def test_mamba2_hybrid_model_trains_a_step():
  model = _model("mamba2_hybrid", 3)
  assert model.layer_mixers() == ["mamba2", "jamba_attention", "mamba2"]
  _check_trains_a_step(model)


# Zamba and shared blocks.


def test_zamba_layers_follow_the_released_config():
  m, s = "mamba", "shared:zamba_attention"
  assert registry.expand_pattern("zamba", 16) == [m, m, s] + [m] * 5 + [s] + [m] * 6 + [s]
  assert registry.expand_pattern("zamba", 3) == [m, m, s]
  assert registry.get("zamba").pattern == (m, m, s, m, m, m, m, m, s)
  assert registry.get("shared:zamba_attention") is registry.get("zamba_attention")
  with pytest.raises(ValueError, match="only a mixer can be shared"):
    registry.expand_pattern("shared:griffin", 3)


def test_zamba_attention_equals_nope_mha_formula():
  _check_member_formula(zamba.ZambaAttention(d_model=D, num_heads=4), num_heads=4,
                        num_kv_heads=4, window=10**6, rope=False)


SHARED_SPEC, TIED_SPEC = "mha,shared:zamba_attention", "mha,zamba_attention"


def _shared_pair(**kw):
  """A 4-layer model mha, S, mha, S with one shared block and its unshared twin."""
  return _model(SHARED_SPEC, 4, **kw), _model(TIED_SPEC, 4, **kw)


def test_shared_block_params_exist_once():
  shared, _ = _shared_pair(mlp="none", shared_mlp="gelu")
  assert shared.layer_mixers() == ["mha", "shared:zamba_attention"] * 2
  params = nn.meta.unbox(jax.eval_shape(shared.init, jax.random.key(0), _tokens())["params"])
  assert sorted(params) == ["block_0", "block_2", "embed", "norm_final",
                            "shared_zamba_attention"]
  assert "mlp" not in params["block_0"] and "mlp" in params["shared_zamba_attention"]
  assert params["shared_zamba_attention"]["mlp"]["wi"]["kernel"].shape[1] == 4 * D  # gelu: 4·D


def test_shared_block_equals_tied_copies():
  """The shared model == its unshared twin with the shared block's params copied into both
  applications (logits), and its gradient == the sum of the twin's two gradients."""
  shared, tied = _shared_pair()
  tokens = _tokens()
  p = mt.random_params(shared, tokens)
  q = {k: v for k, v in p.items() if k != "shared_zamba_attention"}
  q["block_1"] = q["block_3"] = p["shared_zamba_attention"]
  ys, _ = jax.jit(shared.apply)({"params": p}, tokens)
  yt, _ = jax.jit(tied.apply)({"params": q}, tokens)
  assert_rel_close(ys, yt, RTOL["float32"], "shared vs tied copies")

  def loss(model):
    return lambda params: jnp.sum(jnp.sin(model.apply({"params": params}, tokens)[0]))
  gs = jax.jit(jax.grad(loss(shared)))(p)["shared_zamba_attention"]
  gt = jax.jit(jax.grad(loss(tied)))(q)
  both = jax.tree.map(lambda a, b: a + b, gt["block_1"], gt["block_3"])
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(gs)[0], jax.tree.leaves(both)):
    assert_rel_close(a, b, RTOL["float32"], f"grad {jax.tree_util.keystr(path)}")
  one = jax.tree.leaves(gt["block_1"])[0]
  assert np.abs(np.asarray(one)).max() > 0 and np.abs(np.asarray(jax.tree.leaves(
      gt["block_3"])[0])).max() > 0  # both applications contribute


def test_shared_block_decodes_with_a_cache_per_application():
  shared, _ = _shared_pair(mlp="none", shared_mlp="swiglu")
  tokens = _tokens()
  p = mt.random_params(shared, tokens)
  fwd = jax.jit(lambda p_, x, c=None: shared.apply({"params": p_}, x, cache=c))
  want, _ = fwd(p, tokens)
  for chunks in ([1] * tokens.shape[1], [4, 5]):
    cache, out, start = shared.init_cache(tokens.shape[0], tokens.shape[1]), [], 0
    for n in chunks:
      y, cache = fwd(p, tokens[:, start:start + n], cache)
      out.append(y)
      start += n
    assert_rel_close(jnp.concatenate(out, axis=1), want, RTOL["float32"], f"decode {chunks}")
  # The two applications see different streams, so their KV caches differ.
  assert not np.allclose(np.asarray(cache[1].mixer.k), np.asarray(cache[3].mixer.k))


def test_shared_config_errors():
  with pytest.raises(ValueError, match="scan_layers=True stacks one parameter set"):
    _model(SHARED_SPEC, 4, scan_layers=True).layer_mixers()
  with pytest.raises(ValueError, match="shared_mlp='gelu' is set but"):
    _model("gla", 2, shared_mlp="gelu").layer_mixers()
  with pytest.raises(ValueError, match="shared_mlp='moe' is not None or one of"):
    _model(SHARED_SPEC, 2, shared_mlp="moe").layer_mixers()


@pytest.mark.slow
def test_zamba_model_trains_a_step():
  model = _model("zamba", 4, mlp="none", shared_mlp="gelu")
  assert model.layer_mixers() == ["mamba", "mamba", "shared:zamba_attention", "mamba"]
  _check_trains_a_step(model)


def test_train_config_takes_kwargs_of_a_shared_member():
  """model.mixer_kwargs names the shared block's mixer by its registry name."""
  from experiments.configs import shakespeare_char  # pylint: disable=g-import-not-at-top
  from seqmix.train import config as config_lib  # pylint: disable=g-import-not-at-top
  c = shakespeare_char.get_config("mixer=zamba,smoke")
  c.model.n_layers, c.model.mlp, c.model.shared_mlp = 3, "none", "gelu"
  c.model.mixer_kwargs = {"zamba_attention": {"num_heads": 2}}
  config_lib.validate(c)
  c.model.mixer_kwargs = {"mha": {"num_heads": 2}}
  with pytest.raises(config_lib.ConfigError, match="not in the layer pattern"):
    config_lib.validate(c)
