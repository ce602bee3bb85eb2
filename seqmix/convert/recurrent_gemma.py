"""RecurrentGemma (Hugging Face `RecurrentGemmaForCausalLM`, Griffin) <-> seqmix LanguageModel
with the layer pattern of its block_types (recurrent -> "hawk", attention -> "local_mqa").

    HF (torch Linear W [out, in])                     seqmix (block_i/...)
    model.embed_tokens (× bf16(√D))                    embed/embedding, embed_scale = bf16(√D)
    layers.i.temporal_pre_norm (x · (1 + w))           norm_mixer/scale (norm="rmsnorm_1p": same w)
    recurrent: linear_x, linear_y, linear_out (+bias)   mixer/linear_x, linear_y, linear_out
               conv_1d.weight [W, 1, L], bias           mixer/conv_1d/kernel [L, W] time-reversed
               rg_lru.recurrent_param [W]               mixer/rg_lru/a_param
               rg_lru.{input,recurrent}_gate_{weight,bias} mixer/rg_lru/{input_gate, a_gate}/{w, b}
    attention: q/k/v_proj (no bias), o_proj (+bias)     mixer/{q,k,v}_proj, o_proj (o_bias=True)
    layers.i.channel_pre_norm, mlp_block.{gate,up,down}_proj (+bias)  norm_mlp, mlp (mlp="geglu")
    model.final_norm, lm_head (tied), logits_soft_cap  norm_final, embedding, logit_softcap

The RG-LRU's a = σ(−Λ)^(c·r) with c = 8 (transformers hard-codes −8.0), gates block-diagonal
over num_attention_heads blocks as seqmix's `rglru`; the RoPE of the local attention rotates
the first partial_rotary_factor of each head in the rotate-half layout (seqmix's
`rope_fraction`). transformers multiplies the embeddings by √D rounded to bfloat16; the config
carries that rounded value.
"""

import math

import ml_collections
import numpy as np

from seqmix.convert import common

_BLOCKS = {"recurrent": "hawk", "attention": "local_mqa"}


def _bf16_sqrt(d: int) -> float:
  import ml_dtypes
  return float(np.asarray(math.sqrt(d), ml_dtypes.bfloat16).astype(np.float32))


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  common.check_choice("hidden_activation", hf.get("hidden_activation", "gelu_pytorch_tanh"),
                      ("gelu_pytorch_tanh",), "recurrent_gemma")
  rope = dict(hf.get("rope_parameters") or {})
  kind = rope.get("rope_type", "default")
  if kind != "default":
    raise NotImplementedError(f"recurrent_gemma: rope_type={kind!r} is not converted; seqmix's "
                              "MHA implements RoPE types ['default'] only.")
  frac = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
  dh = d // h
  if int(dh * frac) % 2:
    raise NotImplementedError(f"recurrent_gemma: head_dim {dh} · partial_rotary_factor {frac} "
                              "is odd; rotate-half RoPE needs an even rotated width.")
  blocks = list(hf.get("block_types") or ("recurrent", "recurrent", "attention"))
  for b in blocks:
    common.check_choice("block_types entry", b, _BLOCKS, "recurrent_gemma")
  lru = hf.get("lru_width") or d
  names = [_BLOCKS[b] for b in blocks]
  kwargs = {}
  if "hawk" in names:
    kwargs["hawk"] = dict(lru_width=lru, num_heads=h, conv_width=hf.get("conv1d_width", 4), c=8.0)
  if "local_mqa" in names:
    kwargs["local_mqa"] = dict(num_heads=h, num_kv_heads=hf.get("num_key_value_heads") or h,
                               head_dim=dh, window=hf.get("attention_window_size", 2048),
                               rope_fraction=frac, rope_base=float(rope.get("rope_theta", 1e4)),
                               use_bias=bool(hf.get("attention_bias", False)), o_bias=True)
  cap = hf.get("logits_soft_cap")
  return ml_collections.ConfigDict(dict(
      vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
      mixer=",".join(names), mixer_kwargs=kwargs, mlp="geglu",
      mlp_ratio=(hf["intermediate_size"] // 2) / d, norm="rmsnorm_1p",
      norm_eps=hf.get("rms_norm_eps", 1e-6), use_bias=True,
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)), embed_scale=_bf16_sqrt(d),
      logit_softcap=None if cap is None else float(cap), pos_embedding="none"))


def _layer_names(cfg):
  from seqmix import registry
  return registry.expand_pattern(cfg.mixer, cfg.n_layers)


def _dims(cfg):
  d = cfg.d_model
  m = max(1, round(cfg.mlp_ratio * d))
  return d, m


def config_to_hf(cfg) -> dict:
  for field, ok in (("mlp", "geglu"), ("norm", "rmsnorm_1p"), ("pos_embedding", "none"),
                    ("use_bias", True)):
    if cfg[field] != ok:
      raise ValueError(f"recurrent_gemma export: {field}={cfg[field]!r} has no RecurrentGemma "
                       f"equivalent (needs {ok!r}).")
  names = [n.strip() for n in cfg.mixer.split(",")]
  inv = {v: k for k, v in _BLOCKS.items()}
  if any(n not in inv for n in names):
    raise ValueError(f"recurrent_gemma export: mixer={cfg.mixer!r} must be a pattern of "
                     f"{sorted(inv)}.")
  d, m = _dims(cfg)
  if cfg.embed_scale != _bf16_sqrt(d):
    raise ValueError(f"recurrent_gemma export: embed_scale={cfg.embed_scale} must be "
                     f"transformers' bf16(√{d}) = {_bf16_sqrt(d)}.")
  hk = dict(cfg.mixer_kwargs.get("hawk", {}))
  at = dict(cfg.mixer_kwargs.get("local_mqa", {}))
  h = at.get("num_heads") or hk.get("num_heads")
  if hk and at and hk["num_heads"] != at["num_heads"]:
    raise ValueError("recurrent_gemma export: hawk's and local_mqa's num_heads must agree "
                     "(transformers' num_attention_heads sets both).")
  out = dict(model_type="recurrent_gemma", architectures=["RecurrentGemmaForCausalLM"],
             vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=2 * m,
             num_hidden_layers=cfg.n_layers, num_attention_heads=h,
             block_types=[inv[n] for n in names], rms_norm_eps=cfg.norm_eps,
             hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=cfg.tie_embeddings,
             logits_soft_cap=cfg.logit_softcap, lru_width=hk.get("lru_width") or d,
             conv1d_width=hk.get("conv_width", 4), bos_token_id=None, eos_token_id=None,
             pad_token_id=None)
  if at:
    out.update(num_key_value_heads=at.get("num_kv_heads") or h,
               attention_window_size=at["window"], attention_bias=bool(at.get("use_bias")),
               partial_rotary_factor=at.get("rope_fraction", 0.5),
               rope_parameters={"rope_type": "default", "rope_theta": at.get("rope_base", 1e4),
                                "partial_rotary_factor": at.get("rope_fraction", 0.5)})
  return out


def params_from_hf(r: common.TensorReader, cfg) -> dict:
  d, m = _dims(cfg)
  vo = cfg.vocab_size
  lin = lambda name, n_in, n_out: {"kernel": common.t(r.take(f"{name}.weight", (n_out, n_in))),
                                   "bias": r.take(f"{name}.bias", (n_out,))}
  params = {"embed": {"embedding": r.take("model.embed_tokens.weight", (vo, d))}}
  for i, name in enumerate(_layer_names(cfg)):
    p = f"model.layers.{i}"
    tb = f"{p}.temporal_block"
    if name == "hawk":
      hk = cfg.mixer_kwargs["hawk"]
      w, h, l = hk["lru_width"], hk["num_heads"], hk["conv_width"]
      bw = w // h
      gate = lambda g: {"w": r.take(f"{tb}.rg_lru.{g}_gate_weight", (h, bw, bw)),
                        "b": r.take(f"{tb}.rg_lru.{g}_gate_bias", (h, bw))}
      mixer = {"linear_y": lin(f"{tb}.linear_y", d, w), "linear_x": lin(f"{tb}.linear_x", d, w),
               "conv_1d": {"kernel": common.torch_conv_to_taps(
                   r.take(f"{tb}.conv_1d.weight", (w, 1, l))),
                           "bias": r.take(f"{tb}.conv_1d.bias", (w,))},
               "rg_lru": {"a_param": r.take(f"{tb}.rg_lru.recurrent_param", (w,)),
                          "input_gate": gate("input"), "a_gate": gate("recurrent")},
               "linear_out": lin(f"{tb}.linear_out", w, d)}
    else:
      at = cfg.mixer_kwargs["local_mqa"]
      h, g, dh = at["num_heads"], at["num_kv_heads"], at["head_dim"]
      bias = bool(at.get("use_bias"))

      def proj(n, heads):
        q = {"kernel": common.t(r.take(f"{tb}.{n}.weight", (heads * dh, d))).reshape(d, heads, dh)}
        if bias:
          q["bias"] = r.take(f"{tb}.{n}.bias", (heads * dh,)).reshape(heads, dh)
        return q

      mixer = {"q_proj": proj("q_proj", h), "k_proj": proj("k_proj", g),
               "v_proj": proj("v_proj", g),
               "o_proj": {"kernel": common.t(r.take(f"{tb}.o_proj.weight", (d, h * dh))).reshape(
                   h, dh, d), "bias": r.take(f"{tb}.o_proj.bias", (d,))}}
    mb = f"{p}.mlp_block"
    params[f"block_{i}"] = {
        "norm_mixer": {"scale": r.take(f"{p}.temporal_pre_norm.weight", (d,))}, "mixer": mixer,
        "norm_mlp": {"scale": r.take(f"{p}.channel_pre_norm.weight", (d,))},
        "mlp": {"wi_gate": lin(f"{mb}.gate_proj", d, m), "wi_up": lin(f"{mb}.up_proj", d, m),
                "wo": lin(f"{mb}.down_proj", m, d)}}
  params["norm_final"] = {"scale": r.take("model.final_norm.weight", (d,))}
  if cfg.tie_embeddings:
    if r.has("lm_head.weight"):
      r.take("lm_head.weight", (vo, d))
  else:
    params["head"] = {"kernel": common.t(r.take("lm_head.weight", (vo, d)))}
  return params


def params_to_hf(params, cfg) -> dict:
  d, _ = _dims(cfg)
  out = {"model.embed_tokens.weight": params["embed"]["embedding"]}

  def lin(name, p):
    out[f"{name}.weight"] = common.t(p["kernel"])
    out[f"{name}.bias"] = p["bias"]

  for i, name in enumerate(_layer_names(cfg)):
    blk, p = params[f"block_{i}"], f"model.layers.{i}"
    tb, mx = f"{p}.temporal_block", blk["mixer"]
    out[f"{p}.temporal_pre_norm.weight"] = blk["norm_mixer"]["scale"]
    if name == "hawk":
      for n in ("linear_y", "linear_x", "linear_out"):
        lin(f"{tb}.{n}", mx[n])
      out[f"{tb}.conv_1d.weight"] = common.taps_to_torch_conv(mx["conv_1d"]["kernel"])
      out[f"{tb}.conv_1d.bias"] = mx["conv_1d"]["bias"]
      out[f"{tb}.rg_lru.recurrent_param"] = mx["rg_lru"]["a_param"]
      for hf_g, g in (("input", "input_gate"), ("recurrent", "a_gate")):
        out[f"{tb}.rg_lru.{hf_g}_gate_weight"] = mx["rg_lru"][g]["w"]
        out[f"{tb}.rg_lru.{hf_g}_gate_bias"] = mx["rg_lru"][g]["b"]
    else:
      for n in ("q_proj", "k_proj", "v_proj"):
        out[f"{tb}.{n}.weight"] = common.t(np.asarray(mx[n]["kernel"]).reshape(d, -1))
        if "bias" in mx[n]:
          out[f"{tb}.{n}.bias"] = np.asarray(mx[n]["bias"]).reshape(-1)
      out[f"{tb}.o_proj.weight"] = common.t(np.asarray(mx["o_proj"]["kernel"]).reshape(-1, d))
      out[f"{tb}.o_proj.bias"] = mx["o_proj"]["bias"]
    out[f"{p}.channel_pre_norm.weight"] = blk["norm_mlp"]["scale"]
    for hf_n, n in (("gate_proj", "wi_gate"), ("up_proj", "wi_up"), ("down_proj", "wo")):
      lin(f"{p}.mlp_block.{hf_n}", blk["mlp"][n])
  out["model.final_norm.weight"] = params["norm_final"]["scale"]
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = common.t(params["head"]["kernel"])
  return {k: np.ascontiguousarray(np.asarray(v)) for k, v in out.items()}
