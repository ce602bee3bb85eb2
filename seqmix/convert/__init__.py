"""Pretrained checkpoints in and out: Hugging Face `transformers` checkpoints <-> seqmix models.

    cfg, params = convert.from_hf("path/to/hf_dir")          # local files only
    model = seqmix.models.lm.from_config(cfg)
    logits, _ = model.apply({"params": params}, tokens)
    convert.to_hf(cfg, params, "out_dir")                      # config.json + model.safetensors
    convert.save_seqmix(cfg, params, "dir"); cfg, params = convert.load_seqmix("dir")

Command line: `python -m seqmix.convert --from hf --path DIR --to DIR` and the reverse
`--from seqmix`. Families (the HF `model_type`): gpt2, llama, mamba, mamba2, recurrent_gemma;
each module's docstring lists its tensor mapping. torch is never imported here: safetensors and NumPy only.
"""

import os

import ml_collections

from seqmix.convert import common, gpt2, llama, mamba, mamba2, recurrent_gemma
from seqmix.convert.common import TensorMismatch, load_state_dict  # noqa: F401

FAMILIES = {"gpt2": gpt2, "llama": llama, "mamba": mamba, "mamba2": mamba2,
            "recurrent_gemma": recurrent_gemma}
NOT_CONVERTED = {"rwkv": "RWKV-4 (HF's rwkv)", "rwkv6": "RWKV-6"}


def _family_module(name: str):
  if name not in FAMILIES:
    extra = (f" ({NOT_CONVERTED[name]} has no converter yet)" if name in NOT_CONVERTED else "")
    raise NotImplementedError(f"model_type={name!r}{extra} is not converted; supported "
                              f"families: {sorted(FAMILIES)}.")
  return FAMILIES[name]


def family_of(cfg) -> str:
  """The HF family a seqmix config maps to: mamba / mamba2 by mixer, gpt2 for attention with
  learned positions, llama for attention with RoPE, recurrent_gemma for hawk / local_mqa
  patterns."""
  if cfg.mixer in ("mamba", "mamba2"):
    return cfg.mixer
  if cfg.mixer == "mha":
    return "gpt2" if cfg.pos_embedding == "learned" else "llama"
  if cfg.mixer in ("griffin", "hawk") or {n.strip() for n in cfg.mixer.split(",")} <= {
      "hawk", "local_mqa"}:
    return "recurrent_gemma"
  raise NotImplementedError(f"mixer={cfg.mixer!r} has no Hugging Face family to export to; "
                            f"supported: mha (gpt2, llama), mamba, mamba2, hawk / local_mqa patterns (recurrent_gemma).")


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  return _family_module(hf.get("model_type", "?")).config_from_hf(hf)


def params_from_hf(tensors: dict, cfg, family: str, *, progress: bool = True) -> dict:
  mod = _family_module(family)
  reader = common.TensorReader(tensors, ignore=getattr(mod, "IGNORE", ()), progress=progress,
                               source=f"{family} checkpoint")
  params = mod.params_from_hf(reader, cfg)
  reader.finish()
  return common.unflatten(common.flatten(params))  # plain dicts, the checkpoint's dtypes


def from_hf(path: str, *, progress: bool = True):
  """(config, params) of a local HF checkpoint directory (config.json + safetensors)."""
  hf = common.read_json(os.path.join(path, common.HF_CONFIG))
  cfg = config_from_hf(hf)
  tensors = load_state_dict(path, progress=progress)
  return cfg, params_from_hf(tensors, cfg, hf["model_type"], progress=progress)


def to_hf(cfg, params, path: str, *, family: str | None = None, progress: bool = True) -> None:
  """Write config.json + model.safetensors that `transformers` loads with from_pretrained."""
  family = family or family_of(cfg)
  mod = _family_module(family)
  params = common.unbox(params)
  hf = mod.config_to_hf(cfg)
  hf.setdefault("dtype", "float32")
  tensors = mod.params_to_hf(params, cfg)
  os.makedirs(path, exist_ok=True)
  common.write_json(hf, os.path.join(path, common.HF_CONFIG))
  common.save_state_dict(dict(common.tqdm(tensors.items(), desc="write tensors",
                                          disable=not progress, leave=False)),
                         os.path.join(path, common.HF_WEIGHTS))


def save_seqmix(cfg, params, path: str) -> None:
  """seqmix's checkpoint: seqmix_config.json (LanguageModel fields) + a safetensors file of
  the params with '/'-joined paths ("block_0/mixer/q_proj/kernel")."""
  os.makedirs(path, exist_ok=True)
  common.write_json(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg),
                    os.path.join(path, common.SEQMIX_CONFIG))
  common.save_state_dict(common.flatten(common.unbox(params)),
                         os.path.join(path, common.SEQMIX_PARAMS), metadata={"format": "seqmix"})


def load_seqmix(path: str, *, progress: bool = True):
  cfg = ml_collections.ConfigDict(common.read_json(os.path.join(path, common.SEQMIX_CONFIG)))
  flat = load_state_dict(os.path.join(path, common.SEQMIX_PARAMS), progress=progress)
  return cfg, common.unflatten(flat)
