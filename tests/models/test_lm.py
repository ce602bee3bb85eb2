"""LanguageModel: decoding == parallel, scan/remat/tying equivalences, dtypes, config errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from seqmix import registry
from seqmix.mixers import testing as mt
from seqmix.models import lm
from seqmix.testing import RTOL, assert_rel_close, assert_trees_rel_close

V, D, L, B, T = 23, 32, 2, 2, 9


def _tokens(seed=0, b=B, t=T):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def _model(mixer, **kw):
  name, mixer_kwargs = mixer
  return lm.LanguageModel(vocab_size=V, d_model=D, n_layers=L, mixer=name,
                          mixer_kwargs=mixer_kwargs, max_len=32, **kw)


@functools.lru_cache(maxsize=None)
def _params(model, seed=0):
  return mt.random_params(model, _tokens(), seed=seed)


@functools.lru_cache(maxsize=None)
def _fwd(model):
  return jax.jit(lambda p, x, cache=None, pos=None: model.apply({"params": p}, x, cache=cache,
                                                                  positions=pos))


def _decode(model, params, tokens, chunks, positions=None):
  """Logits of `tokens` run through the cache in chunks of the given sizes."""
  cache, out, start = model.init_cache(tokens.shape[0], tokens.shape[1]), [], 0
  for n in chunks:
    pos = None if positions is None else positions[:, start:start + n]
    logits, cache = _fwd(model)(params, tokens[:, start:start + n], cache, pos)
    out.append(logits)
    start += n
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("pos_embedding", ["none", "learned"])
def test_decode_matches_parallel(mixer, pos_embedding):
  model = _model(mixer, pos_embedding=pos_embedding)
  params, tokens = _params(model), _tokens()
  logits, cache = _fwd(model)(params, tokens)
  assert cache is None and logits.dtype == jnp.float32 and logits.shape == (B, T, V)
  # Learned positions need explicit positions when decoding (the model counts no tokens).
  pos = jnp.broadcast_to(jnp.arange(T), (B, T)) if pos_embedding == "learned" else None
  assert_rel_close(_decode(model, params, tokens, [1] * T, pos), logits, RTOL["float32"],
                   "token-by-token")
  assert_rel_close(_decode(model, params, tokens, [4, 5], pos), logits, RTOL["float32"],
                   "prefill 4 + 5")


def test_hybrid_pattern_decode_matches_parallel(mixer, toy_registered):
  """Attention interleaved with a constant-state mixer (gla when registered, else the toy)."""
  name = mixer[0]
  if name == toy_registered:
    pytest.skip("needs a second mixer (mha not registered yet)")
  other = "gla" if "gla" in registry.names() else toy_registered
  kwargs = {**mixer[1], other: dict(registry.get(other).test_kwargs)}
  model = lm.LanguageModel(vocab_size=V, d_model=D, n_layers=3, mixer=f"{name},{other}",
                           mixer_kwargs=kwargs)
  assert model.layer_mixers() == [name, other, name]
  params, tokens = _params(model), _tokens()
  logits, _ = _fwd(model)(params, tokens)
  assert_rel_close(_decode(model, params, tokens, [3, 1, 5]), logits, RTOL["float32"], "hybrid")


@pytest.mark.parametrize("pattern", ["griffin", "xlstm"])
def test_registered_pattern_decode_matches_parallel(pattern):
  """A registered layer pattern over its full length: decoding == the parallel forward."""
  if pattern not in registry.names():
    pytest.skip(f"{pattern} not registered")
  members = registry.get(pattern).pattern
  kwargs = {m: dict(registry.get(m).test_kwargs) for m in set(members)}
  model = lm.LanguageModel(vocab_size=V, d_model=D, n_layers=len(members), mixer=pattern,
                           mixer_kwargs=kwargs)
  assert model.layer_mixers() == list(members)
  params, tokens = _params(model), _tokens()
  logits, _ = _fwd(model)(params, tokens)
  assert_rel_close(_decode(model, params, tokens, [4, 1, 4]), logits, RTOL["float32"], pattern)


def test_scan_layers_matches_unscanned(mixer):
  """Same params (stacked on a layer axis) -> same logits, also when decoding."""
  plain, scanned = _model(mixer), _model(mixer, scan_layers=True)
  tokens = _tokens()
  params = _params(plain)
  stacked = lm.stack_block_params(params, L)
  assert jax.tree.structure(stacked) == jax.tree.structure(_params(scanned))
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, _params(scanned))
  want, _ = _fwd(plain)(params, tokens)
  got, _ = _fwd(scanned)(stacked, tokens)
  # Float32 op-for-op the same maths; XLA may fuse the scanned body differently.
  assert_rel_close(got, want, RTOL["float32"], "scanned logits")
  assert_rel_close(_decode(scanned, stacked, tokens, [4, 5]), want, RTOL["float32"],
                   "scanned decode")
  assert_trees_rel_close(lm.unstack_block_params(stacked, L), params, 0.0, "round trip")


def test_scan_stacking_keeps_logical_axes(mixer):
  model = _model(mixer)
  stacked = jax.eval_shape(
      lambda: lm.stack_block_params(model.init(jax.random.key(0), _tokens())["params"], L))
  box = stacked["blocks"]["mlp"]["wo"]["kernel"]
  assert box.names == (None, "mlp", "embed") and box.value.shape[0] == L


def _loss(model, params, tokens):
  logits, _ = model.apply({"params": params}, tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


@functools.lru_cache(maxsize=None)
def _value_and_grad(model):
  return jax.jit(jax.value_and_grad(functools.partial(_loss, model)))


@pytest.mark.parametrize("remat", ["full", pytest.param("dots", marks=pytest.mark.slow)])
def test_remat_same_loss_and_grads(mixer, remat):
  base = _model(mixer)
  params, tokens = _params(base), _tokens()
  want = _value_and_grad(base)(params, tokens)
  got = _value_and_grad(_model(mixer, remat=remat))(params, tokens)
  assert_trees_rel_close(got, want, RTOL["float32"], f"remat={remat}")


def test_remat_with_scan_layers(mixer):
  scanned = _model(mixer, scan_layers=True)
  params, tokens = _params(scanned), _tokens()
  want = _value_and_grad(scanned)(params, tokens)
  got = _value_and_grad(_model(mixer, scan_layers=True, remat="full"))(params, tokens)
  assert_trees_rel_close(got, want, RTOL["float32"], "scan + remat")


def test_tied_equals_untied_with_head_set_to_embedding(mixer):
  tied, untied = _model(mixer, tie_embeddings=True), _model(mixer, tie_embeddings=False)
  tokens = _tokens()
  params = _params(tied)
  assert "head" not in params
  u_params = _params(untied)
  assert u_params["head"]["kernel"].shape == (D, V)
  u_params = {**params, "head": {"kernel": params["embed"]["embedding"].T}}
  assert_rel_close(_fwd(untied)(u_params, tokens)[0], _fwd(tied)(params, tokens)[0],
                   RTOL["float32"], "tied vs untied")


def test_bf16_compute_with_float32_params(mixer):
  model = _model(mixer, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  params, tokens = _params(model), _tokens()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits, _ = _fwd(model)(params, tokens)
  assert logits.dtype == jnp.float32
  want, _ = _fwd(_model(mixer))(params, tokens)
  # bf16 keeps 8 mantissa bits (rounding 2^-9 ≈ 2e-3 relative per cast); a 2-layer stack
  # rounds activations ~10 times along a path (norm, projections, MLP, residual adds), and the
  # errors add in quadrature to ~1e-2 (DESIGN.md's bf16 tolerance) but can sum coherently
  # through the residual stream: 3e-2 leaves headroom for that and still catches a wrong cast.
  assert_rel_close(logits, want, 3e-2, "bf16 vs float32 compute")


@pytest.mark.slow
def test_bf16_grads_finite(mixer):
  model = _model(mixer, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  _, grads = _value_and_grad(model)(_params(model), _tokens())
  assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
             for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("mlp,ratio,hidden", [("gelu", None, 4 * D), ("swiglu", None, 85),
                                              ("swiglu", 2.0, 2 * D), ("none", None, None)])
def test_mlp_choices(mixer, mlp, ratio, hidden):
  model = _model(mixer, mlp=mlp, mlp_ratio=ratio, norm="layernorm", use_bias=True)
  params = _params(model)
  block = params["block_0"]
  if hidden is None:
    assert "mlp" not in block and "norm_mlp" not in block
  else:
    kernels = [v["kernel"] for v in block["mlp"].values()]
    assert {k.shape for k in kernels} == {(D, hidden), (hidden, D)}
    assert all("bias" in v for v in block["mlp"].values())
  assert "bias" in block["norm_mixer"]  # layernorm with use_bias
  if mlp == "gelu":  # one forward through the layernorm + GELU path (swiglu runs everywhere)
    assert np.isfinite(np.asarray(_fwd(model)(params, _tokens())[0])).all()


def test_rwkv_channel_mix_block_decodes_and_isolates_documents(mixer):
  """The stateful MLP: RWKV-6 width and init, decode == parallel, no leak across documents."""
  model = _model(mixer, mlp="rwkv_channel_mix")
  block = mt.random_params(model, _tokens())["block_1"]["mlp"]
  assert block["key"]["kernel"].shape == (D, 96)  # int(3.5 * 32) // 32 * 32
  params, tokens = _params(model), _tokens()
  logits, _ = _fwd(model)(params, tokens)
  assert_rel_close(_decode(model, params, tokens, [1] * T), logits, RTOL["float32"],
                   "token-by-token")
  assert_rel_close(_decode(model, params, tokens, [4, 5]), logits, RTOL["float32"], "4 + 5")
  # Two documents packed in one row give the logits of the second document alone.
  seg = jnp.asarray([[0] * 4 + [1] * (T - 4)] * B, jnp.int32)
  packed, _ = model.apply({"params": params}, tokens, segment_ids=seg)
  alone, _ = model.apply({"params": params}, tokens[:, 4:])
  assert_rel_close(packed[:, 4:], alone, RTOL["float32"], "second document")
  init = model.init(jax.random.PRNGKey(0), _tokens())["params"]["block_1"]["mlp"]
  init = nn.meta.unbox(init)
  assert not np.any(np.asarray(init["value"]["kernel"]))  # RWKV: W_v, W_r start at zero
  assert not np.any(np.asarray(init["receptance"]["kernel"]))


def test_residual_init_scaling():
  def model(**kw):  # no mixer: only the model's own init is under test
    return lm.LanguageModel(vocab_size=V, d_model=D, n_layers=L, mixer="none", **kw)
  tokens = _tokens()
  base, scaled = jax.jit(lambda k: (model().init(k, tokens)["params"],  # one compile for both
                                    model(residual_init_scaling=True).init(k, tokens)["params"]))(
                                        jax.random.key(0))
  base, scaled = nn.meta.unbox(base), nn.meta.unbox(scaled)
  ratio = (np.std(np.asarray(scaled["block_0"]["mlp"]["wo"]["kernel"]))
           / np.std(np.asarray(base["block_0"]["mlp"]["wo"]["kernel"])))
  np.testing.assert_allclose(ratio, 1 / np.sqrt(2 * L), rtol=1e-5)  # same key, scaled draw
  np.testing.assert_array_equal(scaled["block_0"]["mlp"]["wi_up"]["kernel"],
                                base["block_0"]["mlp"]["wi_up"]["kernel"])


def test_dropout_only_when_not_deterministic(mixer):
  model = _model(mixer, dropout=0.5)
  params, tokens = _params(model), _tokens()
  det, _ = _fwd(model)(params, tokens)
  want, _ = _fwd(_model(mixer))(params, tokens)
  np.testing.assert_array_equal(det, want)  # deterministic=True (the default): no dropout
  drop, _ = jax.jit(lambda p, x, k: model.apply({"params": p}, x, deterministic=False,
                                                rngs={"dropout": k}))(params, tokens,
                                                                      jax.random.key(1))
  assert not np.allclose(drop, det)


def test_from_config_builds_the_same_model(mixer):
  cfg = ml_collections.ConfigDict(dict(vocab_size=V, d_model=D, n_layers=L, mixer=mixer[0],
                                       mixer_kwargs=mixer[1], max_len=32, dtype="bfloat16"))
  model = lm.from_config(cfg)
  assert model.dtype == jnp.bfloat16 and model.mixer == mixer[0] and model.n_layers == L
  assert lm.from_config(dict(vocab_size=V, d_model=D, n_layers=L)).mixer == "mha"


def test_no_mixer_model_has_no_token_mixing():
  model = lm.LanguageModel(vocab_size=V, d_model=D, n_layers=L, mixer="none")
  params, tokens = _params(model), _tokens()
  assert "mixer" not in params["block_0"]
  logits, _ = _fwd(model)(params, tokens)
  shifted, _ = _fwd(model)(params, jnp.roll(tokens, 1, axis=1))
  np.testing.assert_allclose(np.roll(logits, 1, axis=1), shifted, rtol=1e-6, atol=1e-6)


# Configuration errors say what to change.


def test_unknown_mixer_names_the_closest():
  with pytest.raises(KeyError, match="Did you mean 'toy'"):
    lm.LanguageModel(vocab_size=V, d_model=D, n_layers=L, mixer="tyo").init_cache(1, 4)


def test_unknown_mixer_kwarg_lists_the_mixer_fields(toy_registered):
  model = lm.LanguageModel(vocab_size=V, d_model=D, n_layers=L, mixer=toy_registered,
                           mixer_kwargs={toy_registered: {"tapz": 2}})
  with pytest.raises(ValueError, match=r"unknown field 'tapz'.*Did you mean 'taps'.*Fields of"):
    model.init(jax.random.key(0), _tokens())
  model = model.clone(mixer_kwargs={toy_registered: {"d_model": 8}})
  with pytest.raises(ValueError, match="set by the model"):
    model.init_cache(1, 4)


def test_unknown_config_field_lists_valid_fields():
  with pytest.raises(ValueError, match=r"unknown field 'n_layer'\. Did you mean 'n_layers'"):
    lm.from_config({"vocab_size": V, "d_model": D, "n_layer": 2})


def test_scan_layers_with_a_mixed_pattern_says_what_to_change(toy_registered):
  others = [n for n in registry.names(include_patterns=False) if n != toy_registered]
  if not others:
    pytest.skip("needs a second registered mixer")
  model = lm.LanguageModel(vocab_size=V, d_model=D, n_layers=2,
                           mixer=f"{toy_registered},{others[0]}", scan_layers=True)
  with pytest.raises(ValueError, match="set scan_layers=False"):
    model.init(jax.random.key(0), _tokens())


@pytest.mark.parametrize("field,value,match", [
    ("mlp", "relu", "mlp='relu' is not one of"), ("norm", "batchnorm", "norm='batchnorm'"),
    ("remat", "some", "remat='some'"), ("pos_embedding", "rope", "pos_embedding='rope'")])
def test_bad_choices(mixer, field, value, match):
  with pytest.raises(ValueError, match=match):
    _model(mixer, **{field: value}).init_cache(1, 4)


def test_learned_positions_need_positions_when_decoding(mixer):
  model = _model(mixer, pos_embedding="learned")
  params = _params(model)
  with pytest.raises(ValueError, match="needs explicit `positions`"):
    model.apply({"params": params}, _tokens(t=1), cache=model.init_cache(B, 4))
  with pytest.raises(ValueError, match="exceeds max_len=32"):
    model.apply({"params": params}, _tokens(t=33))


_MHA = ("mha", {"mha": {"num_heads": 4}})


def test_embed_scale_equals_scaled_embedding_table():
  """embed_scale s with table E computes what s·E does (untied, so the head is unchanged)."""
  scaled, plain = _model(_MHA, embed_scale=2.5, tie_embeddings=False), _model(
      _MHA, tie_embeddings=False)
  tokens = _tokens()
  params = _params(plain)
  s_params = {**params, "embed": {"embedding": 2.5 * params["embed"]["embedding"]}}
  assert_rel_close(_fwd(scaled)(params, tokens)[0], _fwd(plain)(s_params, tokens)[0],
                   RTOL["float32"], "embed_scale")


def test_logit_softcap_is_c_tanh_of_logits_over_c():
  capped, plain = _model(_MHA, logit_softcap=0.5), _model(_MHA)
  tokens = _tokens()
  params = _params(plain)
  raw = np.asarray(_fwd(plain)(params, tokens)[0], np.float64)
  assert np.abs(raw).max() > 0.5  # the cap is active somewhere
  assert_rel_close(_fwd(capped)(params, tokens)[0], 0.5 * np.tanh(raw / 0.5), RTOL["float32"],
                   "softcap")
  with pytest.raises(ValueError, match="logit_softcap=0.0 must be > 0"):
    _model(_MHA, logit_softcap=0.0).init(jax.random.key(0), tokens)


def test_mha_o_bias_overrides_use_bias_on_the_output_projection_only():
  from seqmix.mixers.attention.mha import MHA
  x = jnp.ones((1, 3, D))
  p = nn.unbox(MHA(d_model=D, num_heads=4, o_bias=True).init(jax.random.key(0), x))["params"]
  assert "bias" in p["o_proj"] and "bias" not in p["q_proj"]
  p = nn.unbox(MHA(d_model=D, num_heads=4, use_bias=True, o_bias=False).init(
      jax.random.key(0), x))["params"]
  assert "bias" not in p["o_proj"] and "bias" in p["k_proj"]
