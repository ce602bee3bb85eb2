"""GPT-2 (Hugging Face `GPT2LMHeadModel`) <-> seqmix LanguageModel(mixer="mha").

    HF                                   seqmix
    transformer.wte / wpe                embed/embedding, pos_embed/embedding (learned positions)
    h.i.ln_1, h.i.ln_2 (LayerNorm+bias)  block_i/norm_mixer, block_i/norm_mlp
    h.i.attn.c_attn  W [D, 3D], b [3D]   block_i/mixer/{q,k,v}_proj: kernel [D, H, Dh], bias [H, Dh]
    h.i.attn.c_proj  W [D, D]            block_i/mixer/o_proj: kernel [H, Dh, D]
    h.i.mlp.c_fc, c_proj                 block_i/mlp/wi, wo (mlp="gelu_tanh": GPT-2's gelu_new)
    ln_f, lm_head (tied)                 norm_final, the transposed embedding (tie_embeddings)

GPT-2's `Conv1D` stores W as [in, out] (y = x W + b), the transpose of torch Linear, which is
already the Flax Dense layout; the fused c_attn is split into q, k, v in that order.
"""

import ml_collections
import numpy as np

from seqmix.convert import common

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_IGNORE = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  d, h = hf["n_embd"], hf["n_head"]
  act = hf.get("activation_function", "gelu_new")
  common.check_choice("activation_function", act, _ACTIVATIONS, "gpt2")
  for field, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
    if hf.get(field, ok) != ok:
      raise NotImplementedError(f"gpt2: {field}={hf[field]!r} is not converted; only "
                                f"{field}={ok} (the GPT-2 default) is supported.")
  inner = hf.get("n_inner") or 4 * d
  return ml_collections.ConfigDict(dict(
      vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], mixer="mha",
      mixer_kwargs={"mha": dict(num_heads=h, position="none", use_bias=True)},
      mlp=_ACTIVATIONS[act], mlp_ratio=inner / d, norm="layernorm",
      norm_eps=hf.get("layer_norm_epsilon", 1e-5), use_bias=True,
      tie_embeddings=hf.get("tie_word_embeddings", True), pos_embedding="learned",
      max_len=hf["n_positions"]))


def config_to_hf(cfg) -> dict:
  mha = cfg.mixer_kwargs["mha"]
  inv = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
  return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
              n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=mha["num_heads"],
              n_positions=cfg.max_len, n_inner=_hidden(cfg), activation_function=inv[cfg.mlp],
              layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _hidden(cfg) -> int:
  return max(1, round(cfg.mlp_ratio * cfg.d_model))


def check_config(cfg) -> None:
  """The seqmix configs this mapping writes back: GPT-2's own layout, nothing else."""
  mha = dict(cfg.mixer_kwargs.get("mha", {}))
  want = dict(mixer="mha", mlp=("gelu_tanh", "gelu"), norm="layernorm", use_bias=True,
              pos_embedding="learned")
  for field, ok in want.items():
    v = cfg[field]
    if v not in (ok if isinstance(ok, tuple) else (ok,)):
      raise ValueError(f"gpt2 export: {field}={v!r} has no GPT-2 equivalent (needs {ok!r}).")
  if mha.get("position", "rope") != "none" or not mha.get("use_bias", False) or \
     mha.get("num_kv_heads") not in (None, mha["num_heads"]) or mha.get("head_dim") not in (
         None, cfg.d_model // mha["num_heads"]) or mha.get("qk_norm") or mha.get("window"):
    raise ValueError(f"gpt2 export: mixer_kwargs['mha']={mha} has no GPT-2 equivalent (needs "
                     "position='none', use_bias=True, full heads of d_model/num_heads, no "
                     "qk_norm, no window).")


def params_from_hf(r: common.TensorReader, cfg) -> dict:
  d, l = cfg.d_model, cfg.n_layers
  h = cfg.mixer_kwargs["mha"]["num_heads"]
  dh, m, vo = d // h, _hidden(cfg), cfg.vocab_size
  pre = "transformer." if r.has("transformer.wte.weight") else ""
  ln = lambda name: {"scale": r.take(f"{name}.weight", (d,)), "bias": r.take(f"{name}.bias", (d,))}
  params = {"embed": {"embedding": r.take(f"{pre}wte.weight", (vo, d))},
            "pos_embed": {"embedding": r.take(f"{pre}wpe.weight", (cfg.max_len, d))}}
  for i in range(l):
    p = f"{pre}h.{i}"
    w = r.take(f"{p}.attn.c_attn.weight", (d, 3 * d))
    b = r.take(f"{p}.attn.c_attn.bias", (3 * d,))
    wq, wk, wv = np.split(w, 3, axis=1)                        # [d, d] each (Conv1D: in, out)
    bq, bk, bv = np.split(b, 3)
    proj = lambda w_, b_: {"kernel": w_.reshape(d, h, dh), "bias": b_.reshape(h, dh)}
    params[f"block_{i}"] = {
        "norm_mixer": ln(f"{p}.ln_1"),
        "mixer": {"q_proj": proj(wq, bq), "k_proj": proj(wk, bk), "v_proj": proj(wv, bv),
                  "o_proj": {"kernel": r.take(f"{p}.attn.c_proj.weight", (d, d)).reshape(h, dh, d),
                             "bias": r.take(f"{p}.attn.c_proj.bias", (d,))}},
        "norm_mlp": ln(f"{p}.ln_2"),
        "mlp": {"wi": {"kernel": r.take(f"{p}.mlp.c_fc.weight", (d, m)),
                       "bias": r.take(f"{p}.mlp.c_fc.bias", (m,))},
                "wo": {"kernel": r.take(f"{p}.mlp.c_proj.weight", (m, d)),
                       "bias": r.take(f"{p}.mlp.c_proj.bias", (d,))}}}
  params["norm_final"] = ln(f"{pre}ln_f")
  if cfg.tie_embeddings:
    if r.has("lm_head.weight"):  # some exports write the tied head out as well
      r.take("lm_head.weight", (vo, d))
  else:
    params["head"] = {"kernel": common.t(r.take("lm_head.weight", (vo, d)))}
  return params


def params_to_hf(params, cfg) -> dict:
  check_config(cfg)
  d = cfg.d_model
  pre = "transformer."
  out = {f"{pre}wte.weight": params["embed"]["embedding"],
         f"{pre}wpe.weight": params["pos_embed"]["embedding"]}

  def ln(name, p):
    out[f"{name}.weight"], out[f"{name}.bias"] = p["scale"], p["bias"]

  for i in range(cfg.n_layers):
    blk, p = params[f"block_{i}"], f"{pre}h.{i}"
    mx = blk["mixer"]
    ln(f"{p}.ln_1", blk["norm_mixer"])
    out[f"{p}.attn.c_attn.weight"] = np.concatenate(
        [np.asarray(mx[n]["kernel"]).reshape(d, d) for n in ("q_proj", "k_proj", "v_proj")], 1)
    out[f"{p}.attn.c_attn.bias"] = np.concatenate(
        [np.asarray(mx[n]["bias"]).reshape(d) for n in ("q_proj", "k_proj", "v_proj")])
    out[f"{p}.attn.c_proj.weight"] = np.asarray(mx["o_proj"]["kernel"]).reshape(d, d)
    out[f"{p}.attn.c_proj.bias"] = mx["o_proj"]["bias"]
    ln(f"{p}.ln_2", blk["norm_mlp"])
    for hf_name, name in (("c_fc", "wi"), ("c_proj", "wo")):
      out[f"{p}.mlp.{hf_name}.weight"] = blk["mlp"][name]["kernel"]
      out[f"{p}.mlp.{hf_name}.bias"] = blk["mlp"][name]["bias"]
  ln(f"{pre}ln_f", params["norm_final"])
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = common.t(params["head"]["kernel"])
  return {k: np.ascontiguousarray(np.asarray(v)) for k, v in out.items()}


IGNORE = _IGNORE
