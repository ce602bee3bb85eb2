"""Mamba2 (Hugging Face `Mamba2ForCausalLM`) <-> seqmix LanguageModel(mixer="mamba2", mlp="none").

    HF (torch Linear W [out, in])                   seqmix (block_i/mixer/...)
    backbone.embeddings                             embed/embedding
    layers.i.norm (RMSNorm)                         block_i/norm_mixer/scale
    layers.i.mixer.in_proj [E + C + H, D]           in_proj/kernel [D, E + C + H]  ([z, xBC, dt])
    layers.i.mixer.conv1d.weight [C, 1, L], bias    conv1d/kernel [L, C] time-reversed, conv1d/bias
    layers.i.mixer.dt_bias, A_log, D [H]            dt_bias, A_log, D
    layers.i.mixer.norm.weight [E]                  norm/scale (gated RMSNorm, gate before norm)
    layers.i.mixer.out_proj [D, E]                  out_proj/kernel [E, D]
    backbone.norm_f, lm_head                        norm_final, head (or tied)

E = expand · D = H · P, C = E + 2 · G · N (x, B, C of the conv). transformers' gated RMSNorm
normalises all E channels at once whatever n_groups (mamba_ssm normalises each group's E/G),
so the seqmix config gets norm_groups=1. chunk_size (a compute setting of the chunked scan)
passes through both ways, so an exported config reproduces the original's float rounding. time_step_limit other than (0, inf) (a clamp of Δ that
seqmix's Mamba2 does not apply) is refused.
"""

import math

import ml_collections
import numpy as np

from seqmix.convert import common


def _json_float(x) -> float:
  """A float of config.json; transformers writes non-finite ones as {"__float__": "Infinity"}."""
  return float(x["__float__"]) if isinstance(x, dict) else float(x)


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  d = hf["hidden_size"]
  expand = hf.get("expand", 2)
  e = int(expand * d)
  if e != expand * d or e % d:
    raise NotImplementedError(f"mamba2: expand={expand} is not converted; seqmix's Mamba2 has "
                              "an integer expand (E = expand · hidden_size).")
  h, p = hf["num_heads"], hf["head_dim"]
  if h * p != e:
    raise ValueError(f"mamba2 config: num_heads={h} · head_dim={p} = {h * p} must equal "
                     f"expand · hidden_size = {e}.")
  common.check_choice("hidden_act", hf.get("hidden_act", "silu"), ("silu",), "mamba2")
  lim = tuple(_json_float(x) for x in hf.get("time_step_limit", (0.0, math.inf)))
  if lim != (0.0, math.inf):
    raise NotImplementedError(f"mamba2: time_step_limit={list(lim)} is not converted; only "
                              "(0.0, inf) (no clamp of Δ) is supported.")
  if not hf.get("rms_norm", True):
    raise NotImplementedError("mamba2: rms_norm=False is not converted; seqmix's Mamba2 always "
                              "has the gated RMSNorm.")
  eps = hf.get("layer_norm_epsilon", 1e-5)
  return ml_collections.ConfigDict(dict(
      vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], mixer="mamba2",
      mixer_kwargs={"mamba2": dict(d_state=hf.get("state_size", 128),
                                   d_conv=hf.get("conv_kernel", 4), expand=e // d, headdim=p,
                                   ngroups=hf.get("n_groups", 1), norm_eps=eps, norm_groups=1,
                                   conv_bias=bool(hf.get("use_conv_bias", True)),
                                   bias=bool(hf.get("use_bias", False)),
                                   chunk_size=hf.get("chunk_size", 256))},
      mlp="none", norm="rmsnorm", norm_eps=eps,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), pos_embedding="none"))


def _dims(cfg):
  mk = cfg.mixer_kwargs["mamba2"]
  d = cfg.d_model
  e = mk.get("expand", 2) * d
  p = mk.get("headdim", 64)
  g, n = mk.get("ngroups", 1), mk.get("d_state", 128)
  return d, e, e // p, p, g, n, mk.get("d_conv", 4), e + 2 * g * n


def config_to_hf(cfg) -> dict:
  for field, ok in (("mixer", "mamba2"), ("mlp", "none"), ("norm", "rmsnorm"),
                    ("pos_embedding", "none")):
    if cfg[field] != ok:
      raise ValueError(f"mamba2 export: {field}={cfg[field]!r} has no HF Mamba2 equivalent "
                       f"(needs {ok!r}).")
  mk = cfg.mixer_kwargs["mamba2"]
  d, e, h, p, g, n, l, _ = _dims(cfg)
  if g > 1 and (mk.get("norm_groups") or g) != 1:
    raise ValueError(f"mamba2 export: ngroups={g} with the gated norm over each group "
                     f"(norm_groups={mk.get('norm_groups')}) has no transformers equivalent: "
                     "its Mamba2 normalises the whole inner width (norm_groups=1).")
  if mk.get("norm_eps", 1e-5) != cfg.norm_eps:
    raise ValueError(f"mamba2 export: the mixer's norm_eps={mk.get('norm_eps')} differs from "
                     f"the model's norm_eps={cfg.norm_eps}; transformers has one "
                     "layer_norm_epsilon for both.")
  return dict(model_type="mamba2", architectures=["Mamba2ForCausalLM"], vocab_size=cfg.vocab_size,
              hidden_size=d, expand=e // d, num_heads=h, head_dim=p, n_groups=g, state_size=n,
              conv_kernel=l, num_hidden_layers=cfg.n_layers, use_bias=bool(mk.get("bias", False)),
              use_conv_bias=bool(mk.get("conv_bias", True)), hidden_act="silu",
              layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              time_step_limit=[0.0, {"__float__": "Infinity"}], rms_norm=True, residual_in_fp32=True,
              chunk_size=mk.get("chunk_size", 64), bos_token_id=None, eos_token_id=None,
              pad_token_id=None)


def params_from_hf(r: common.TensorReader, cfg) -> dict:
  d, e, h, _, _, _, l, c = _dims(cfg)
  mk = cfg.mixer_kwargs["mamba2"]
  vo = cfg.vocab_size
  params = {"embed": {"embedding": r.take("backbone.embeddings.weight", (vo, d))}}
  for i in range(cfg.n_layers):
    p = f"backbone.layers.{i}.mixer"
    mx = {"in_proj": {"kernel": common.t(r.take(f"{p}.in_proj.weight", (e + c + h, d)))},
          "conv1d": {"kernel": common.torch_conv_to_taps(r.take(f"{p}.conv1d.weight", (c, 1, l)))},
          "dt_bias": r.take(f"{p}.dt_bias", (h,)), "A_log": r.take(f"{p}.A_log", (h,)),
          "D": r.take(f"{p}.D", (h,)), "norm": {"scale": r.take(f"{p}.norm.weight", (e,))},
          "out_proj": {"kernel": common.t(r.take(f"{p}.out_proj.weight", (d, e)))}}
    if mk.get("conv_bias", True):
      mx["conv1d"]["bias"] = r.take(f"{p}.conv1d.bias", (c,))
    if mk.get("bias", False):
      mx["in_proj"]["bias"] = r.take(f"{p}.in_proj.bias", (e + c + h,))
      mx["out_proj"]["bias"] = r.take(f"{p}.out_proj.bias", (d,))
    params[f"block_{i}"] = {
        "norm_mixer": {"scale": r.take(f"backbone.layers.{i}.norm.weight", (d,))}, "mixer": mx}
  params["norm_final"] = {"scale": r.take("backbone.norm_f.weight", (d,))}
  if cfg.tie_embeddings:
    if r.has("lm_head.weight"):
      r.take("lm_head.weight", (vo, d))
  else:
    params["head"] = {"kernel": common.t(r.take("lm_head.weight", (vo, d)))}
  return params


def params_to_hf(params, cfg) -> dict:
  out = {"backbone.embeddings.weight": params["embed"]["embedding"]}
  for i in range(cfg.n_layers):
    blk, p = params[f"block_{i}"], f"backbone.layers.{i}.mixer"
    mx = blk["mixer"]
    out[f"backbone.layers.{i}.norm.weight"] = blk["norm_mixer"]["scale"]
    for name in ("in_proj", "out_proj"):
      out[f"{p}.{name}.weight"] = common.t(mx[name]["kernel"])
      if "bias" in mx[name]:
        out[f"{p}.{name}.bias"] = mx[name]["bias"]
    out[f"{p}.conv1d.weight"] = common.taps_to_torch_conv(mx["conv1d"]["kernel"])
    if "bias" in mx["conv1d"]:
      out[f"{p}.conv1d.bias"] = mx["conv1d"]["bias"]
    for name in ("dt_bias", "A_log", "D"):
      out[f"{p}.{name}"] = mx[name]
    out[f"{p}.norm.weight"] = mx["norm"]["scale"]
  out["backbone.norm_f.weight"] = params["norm_final"]["scale"]
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = common.t(params["head"]["kernel"])
  return {k: np.ascontiguousarray(np.asarray(v)) for k, v in out.items()}
