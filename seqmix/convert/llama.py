"""Llama (Hugging Face `LlamaForCausalLM`) <-> seqmix LanguageModel(mixer="mha", RoPE).

    HF (torch Linear W [out, in])          seqmix (Flax kernels [in, ...])
    model.embed_tokens                     embed/embedding
    layers.i.input_layernorm (RMSNorm)     block_i/norm_mixer/scale
    layers.i.self_attn.q_proj [H·Dh, D]    block_i/mixer/q_proj/kernel [D, H, Dh]
    layers.i.self_attn.{k,v}_proj [G·Dh, D] block_i/mixer/{k,v}_proj/kernel [D, G, Dh] (GQA)
    layers.i.self_attn.o_proj [D, H·Dh]    block_i/mixer/o_proj/kernel [H, Dh, D]
    layers.i.post_attention_layernorm      block_i/norm_mlp/scale
    layers.i.mlp.{gate,up,down}_proj       block_i/mlp/{wi_gate, wi_up, wo} (SwiGLU)
    model.norm, lm_head                    norm_final, head/kernel (or tied)

RoPE: transformers' Llama rotates in the rotate-half layout (channel i pairs with i + Dh/2),
which is `seqmix.positional.rope`'s layout, so q/k columns need no permutation. rope_scaling:
seqmix's MHA implements the plain rotation only, so any rope_type other than "default"
raises NotImplementedError. attention_bias / mlp_bias map onto the mixer's and the model's
`use_bias` (RMSNorm has no bias, so the model's flag only reaches the MLP).
"""

import ml_collections
import numpy as np

from seqmix.convert import common

SUPPORTED_ROPE_TYPES = ("default",)
IGNORE = ("rotary_emb.inv_freq",)  # a buffer some older exports wrote out


def _rope(hf: dict) -> float:
  rope = dict(hf.get("rope_parameters") or {})
  if hf.get("rope_scaling"):  # transformers 4.x layout
    rope = {**rope, **hf["rope_scaling"]}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in SUPPORTED_ROPE_TYPES:
    raise NotImplementedError(
        f"llama: rope_scaling / rope_parameters rope_type={kind!r} is not converted: seqmix's "
        f"MHA implements RoPE types {list(SUPPORTED_ROPE_TYPES)} only (no position "
        f"interpolation / NTK / YaRN / llama3 scaling yet).")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  common.check_choice("hidden_act", hf.get("hidden_act", "silu"), ("silu",), "llama")
  if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
    raise NotImplementedError(
        f"llama: attention_bias={hf.get('attention_bias')} with mlp_bias={hf.get('mlp_bias')} "
        "is not converted; seqmix needs both on or both off.")
  return ml_collections.ConfigDict(dict(
      vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], mixer="mha",
      mixer_kwargs={"mha": dict(num_heads=h, num_kv_heads=hf.get("num_key_value_heads") or h,
                                head_dim=hf.get("head_dim") or d // h, position="rope",
                                rope_base=_rope(hf),
                                use_bias=bool(hf.get("attention_bias", False)))},
      mlp="swiglu", mlp_ratio=hf["intermediate_size"] / d, norm="rmsnorm",
      norm_eps=hf.get("rms_norm_eps", 1e-6), use_bias=bool(hf.get("mlp_bias", False)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), pos_embedding="none",
      max_len=hf.get("max_position_embeddings", 2048)))


def _dims(cfg):
  mha = cfg.mixer_kwargs["mha"]
  h = mha["num_heads"]
  g = mha.get("num_kv_heads") or h
  dh = mha.get("head_dim") or cfg.d_model // h
  return h, g, dh, max(1, round(cfg.mlp_ratio * cfg.d_model))


def check_config(cfg) -> None:
  mha = dict(cfg.mixer_kwargs.get("mha", {}))
  for field, ok in (("mixer", "mha"), ("mlp", "swiglu"), ("norm", "rmsnorm"),
                    ("pos_embedding", "none")):
    if cfg[field] != ok:
      raise ValueError(f"llama export: {field}={cfg[field]!r} has no Llama equivalent (needs "
                       f"{ok!r}).")
  bad = {k: mha.get(k) for k in ("qk_norm", "window") if mha.get(k)}
  if mha.get("position", "rope") != "rope" or mha.get("rope_fraction", 1.0) != 1.0 or bad or \
     bool(mha.get("use_bias", False)) != bool(cfg.use_bias):
    raise ValueError(f"llama export: mixer_kwargs['mha']={mha} (use_bias={cfg.use_bias}) has "
                     "no Llama equivalent (needs full RoPE, no qk_norm / window, one bias flag).")


def config_to_hf(cfg) -> dict:
  check_config(cfg)
  h, g, dh, m = _dims(cfg)
  base = cfg.mixer_kwargs["mha"].get("rope_base", 10000.0)
  return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=cfg.vocab_size,
              hidden_size=cfg.d_model, intermediate_size=m, num_hidden_layers=cfg.n_layers,
              num_attention_heads=h, num_key_value_heads=g, head_dim=dh, hidden_act="silu",
              rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              attention_bias=bool(cfg.use_bias), mlp_bias=bool(cfg.use_bias),
              max_position_embeddings=cfg.max_len, rope_theta=base,
              rope_parameters={"rope_type": "default", "rope_theta": base},
              bos_token_id=None, eos_token_id=None, pad_token_id=None)


def params_from_hf(r: common.TensorReader, cfg) -> dict:
  d, vo = cfg.d_model, cfg.vocab_size
  h, g, dh, m = _dims(cfg)
  bias = bool(cfg.use_bias)

  def dense_in(name, heads):  # torch [heads·dh, d] -> [d, heads, dh]
    p = {"kernel": common.t(r.take(f"{name}.weight", (heads * dh, d))).reshape(d, heads, dh)}
    if bias:
      p["bias"] = r.take(f"{name}.bias", (heads * dh,)).reshape(heads, dh)
    return p

  def linear(name, n_in, n_out):
    p = {"kernel": common.t(r.take(f"{name}.weight", (n_out, n_in)))}
    if bias:
      p["bias"] = r.take(f"{name}.bias", (n_out,))
    return p

  params = {"embed": {"embedding": r.take("model.embed_tokens.weight", (vo, d))}}
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}"
    o = {"kernel": common.t(r.take(f"{p}.self_attn.o_proj.weight", (d, h * dh))).reshape(h, dh, d)}
    if bias:
      o["bias"] = r.take(f"{p}.self_attn.o_proj.bias", (d,))
    params[f"block_{i}"] = {
        "norm_mixer": {"scale": r.take(f"{p}.input_layernorm.weight", (d,))},
        "mixer": {"q_proj": dense_in(f"{p}.self_attn.q_proj", h),
                  "k_proj": dense_in(f"{p}.self_attn.k_proj", g),
                  "v_proj": dense_in(f"{p}.self_attn.v_proj", g), "o_proj": o},
        "norm_mlp": {"scale": r.take(f"{p}.post_attention_layernorm.weight", (d,))},
        "mlp": {"wi_gate": linear(f"{p}.mlp.gate_proj", d, m),
                "wi_up": linear(f"{p}.mlp.up_proj", d, m),
                "wo": linear(f"{p}.mlp.down_proj", m, d)}}
  params["norm_final"] = {"scale": r.take("model.norm.weight", (d,))}
  if cfg.tie_embeddings:
    if r.has("lm_head.weight"):
      r.take("lm_head.weight", (vo, d))
  else:
    params["head"] = {"kernel": common.t(r.take("lm_head.weight", (vo, d)))}
  return params


def params_to_hf(params, cfg) -> dict:
  d = cfg.d_model
  h, g, dh, _ = _dims(cfg)
  out = {"model.embed_tokens.weight": params["embed"]["embedding"]}

  def put(name, p, shape_out):
    out[f"{name}.weight"] = common.t(p["kernel"].reshape(-1, shape_out) if shape_out else
                                     p["kernel"].reshape(d, -1))
    if "bias" in p:
      out[f"{name}.bias"] = p["bias"].reshape(-1)

  for i in range(cfg.n_layers):
    blk, p = params[f"block_{i}"], f"model.layers.{i}"
    mx = blk["mixer"]
    out[f"{p}.input_layernorm.weight"] = blk["norm_mixer"]["scale"]
    for n in ("q_proj", "k_proj", "v_proj"):
      put(f"{p}.self_attn.{n}", mx[n], None)           # [d, heads, dh] -> [heads·dh, d]
    put(f"{p}.self_attn.o_proj", mx["o_proj"], d)      # [h, dh, d] -> [d, h·dh]
    out[f"{p}.post_attention_layernorm.weight"] = blk["norm_mlp"]["scale"]
    for hf_name, name in (("gate_proj", "wi_gate"), ("up_proj", "wi_up"), ("down_proj", "wo")):
      put(f"{p}.mlp.{hf_name}", blk["mlp"][name], blk["mlp"][name]["kernel"].shape[-1])
  out["model.norm.weight"] = params["norm_final"]["scale"]
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = common.t(params["head"]["kernel"])
  return {k: np.ascontiguousarray(np.asarray(v)) for k, v in out.items()}
