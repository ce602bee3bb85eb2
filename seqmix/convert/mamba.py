"""Mamba (Hugging Face `MambaForCausalLM`) <-> seqmix LanguageModel(mixer="mamba", mlp="none").

    HF (torch Linear W [out, in])               seqmix (block_i/mixer/...)
    backbone.embeddings                         embed/embedding
    layers.i.norm (RMSNorm)                     block_i/norm_mixer/scale
    layers.i.mixer.in_proj [2E, D]              in_proj/kernel [D, 2E]   (x then z, as HF's chunk)
    layers.i.mixer.conv1d.weight [E, 1, L]      conv1d/kernel [L, E]     time-reversed: k[0] = w[..., -1]
    layers.i.mixer.conv1d.bias [E]              conv1d/bias
    layers.i.mixer.x_proj [R + 2N, E]           x_proj/kernel [E, R + 2N] (dt, B, C as HF splits it)
    layers.i.mixer.dt_proj.weight [E, R], .bias dt_proj [R, E], dt_bias [E]
    layers.i.mixer.A_log [E, N], D [E]          A_log, D (the same parameterisation: A = −exp(A_log))
    layers.i.mixer.out_proj [D, E]              out_proj/kernel [E, D]
    backbone.norm_f, lm_head (tied by default)  norm_final, embedding / head

E = intermediate_size = expand · hidden_size (seqmix's `expand` is an integer).
"""

import ml_collections
import numpy as np

from seqmix.convert import common


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  d = hf["hidden_size"]
  e = hf.get("intermediate_size") or int(hf.get("expand", 2) * d)
  if e % d:
    raise NotImplementedError(f"mamba: intermediate_size={e} is not a multiple of hidden_size="
                              f"{d}; seqmix's Mamba has an integer expand (E = expand · D).")
  common.check_choice("hidden_act", hf.get("hidden_act", "silu"), ("silu",), "mamba")
  rank = hf.get("time_step_rank", "auto")
  rank = -(-d // 16) if rank == "auto" else int(rank)
  return ml_collections.ConfigDict(dict(
      vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], mixer="mamba",
      mixer_kwargs={"mamba": dict(d_state=hf.get("state_size", 16),
                                  d_conv=hf.get("conv_kernel", 4), expand=e // d, dt_rank=rank,
                                  conv_bias=bool(hf.get("use_conv_bias", True)),
                                  bias=bool(hf.get("use_bias", False)))},
      mlp="none", norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
      tie_embeddings=bool(hf.get("tie_word_embeddings", True)), pos_embedding="none"))


def _dims(cfg):
  mk = cfg.mixer_kwargs["mamba"]
  d = cfg.d_model
  e = mk.get("expand", 2) * d
  rank = mk.get("dt_rank") or -(-d // 16)
  return d, e, mk.get("d_state", 16), mk.get("d_conv", 4), rank, bool(mk.get("bias", False)), \
      bool(mk.get("conv_bias", True))


def config_to_hf(cfg) -> dict:
  for field, ok in (("mixer", "mamba"), ("mlp", "none"), ("norm", "rmsnorm"),
                    ("pos_embedding", "none")):
    if cfg[field] != ok:
      raise ValueError(f"mamba export: {field}={cfg[field]!r} has no HF Mamba equivalent (needs "
                       f"{ok!r}).")
  d, e, n, l, rank, bias, conv_bias = _dims(cfg)
  return dict(model_type="mamba", architectures=["MambaForCausalLM"], vocab_size=cfg.vocab_size,
              hidden_size=d, intermediate_size=e, expand=e // d, state_size=n, conv_kernel=l,
              time_step_rank=rank, num_hidden_layers=cfg.n_layers, use_bias=bias,
              use_conv_bias=conv_bias, hidden_act="silu", layer_norm_epsilon=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_embeddings, residual_in_fp32=True,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)


def params_from_hf(r: common.TensorReader, cfg) -> dict:
  d, e, n, l, rank, bias, conv_bias = _dims(cfg)
  vo = cfg.vocab_size
  params = {"embed": {"embedding": r.take("backbone.embeddings.weight", (vo, d))}}
  for i in range(cfg.n_layers):
    p = f"backbone.layers.{i}.mixer"
    mx = {"in_proj": {"kernel": common.t(r.take(f"{p}.in_proj.weight", (2 * e, d)))},
          "conv1d": {"kernel": common.torch_conv_to_taps(r.take(f"{p}.conv1d.weight", (e, 1, l)))},
          "x_proj": {"kernel": common.t(r.take(f"{p}.x_proj.weight", (rank + 2 * n, e)))},
          "dt_proj": common.t(r.take(f"{p}.dt_proj.weight", (e, rank))),
          "dt_bias": r.take(f"{p}.dt_proj.bias", (e,)),
          "A_log": r.take(f"{p}.A_log", (e, n)), "D": r.take(f"{p}.D", (e,)),
          "out_proj": {"kernel": common.t(r.take(f"{p}.out_proj.weight", (d, e)))}}
    if conv_bias:
      mx["conv1d"]["bias"] = r.take(f"{p}.conv1d.bias", (e,))
    if bias:
      mx["in_proj"]["bias"] = r.take(f"{p}.in_proj.bias", (2 * e,))
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
    for name in ("in_proj", "x_proj", "out_proj"):
      out[f"{p}.{name}.weight"] = common.t(mx[name]["kernel"])
      if "bias" in mx[name]:
        out[f"{p}.{name}.bias"] = mx[name]["bias"]
    out[f"{p}.conv1d.weight"] = common.taps_to_torch_conv(mx["conv1d"]["kernel"])
    if "bias" in mx["conv1d"]:
      out[f"{p}.conv1d.bias"] = mx["conv1d"]["bias"]
    out[f"{p}.dt_proj.weight"] = common.t(mx["dt_proj"])
    out[f"{p}.dt_proj.bias"] = mx["dt_bias"]
    out[f"{p}.A_log"], out[f"{p}.D"] = mx["A_log"], mx["D"]
  out["backbone.norm_f.weight"] = params["norm_final"]["scale"]
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = common.t(params["head"]["kernel"])
  return {k: np.ascontiguousarray(np.asarray(v)) for k, v in out.items()}
