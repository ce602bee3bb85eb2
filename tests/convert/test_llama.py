"""Llama: transformers' LlamaForCausalLM <-> seqmix (RMSNorm, SwiGLU, GQA, rotate-half RoPE)."""

import os

import numpy as np
import pytest

from tests.convert import parity

transformers = parity.transformers

from seqmix import convert  # noqa: E402
from seqmix.testing import assert_rel_close  # noqa: E402


def _config(**kw):
  base = dict(vocab_size=101, hidden_size=40, intermediate_size=68, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=10, rms_norm_eps=1e-5,
              rope_parameters={"rope_type": "default", "rope_theta": 500.0},
              tie_word_embeddings=False, initializer_range=0.2, max_position_embeddings=128,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
  return transformers.LlamaConfig(**{**base, **kw})


def test_llama_gqa_parity_and_round_trip(tmp_path):
  hf = parity.make_hf(transformers.LlamaForCausalLM, _config())
  cfg, _ = parity.check_family(hf, str(tmp_path), vocab=101)
  mha = cfg.mixer_kwargs["mha"]
  assert (mha["num_heads"], mha["num_kv_heads"], mha["head_dim"]) == (4, 2, 10)
  assert mha["rope_base"] == 500.0 and not cfg.tie_embeddings


def test_llama_tied_with_biases_logits(tmp_path):
  """attention_bias + mlp_bias and tied embeddings (the variant's forward only)."""
  hf = parity.make_hf(transformers.LlamaForCausalLM, _config(
      tie_word_embeddings=True, attention_bias=True, mlp_bias=True, num_key_value_heads=1))
  with parity.torch.no_grad():  # HF initialises biases to zero: make them count
    for name, p in hf.named_parameters():
      if name.endswith(".bias"):
        p.normal_(0.0, 0.3)
  hf.save_pretrained(tmp_path)
  cfg, params = convert.from_hf(str(tmp_path), progress=False)
  assert cfg.tie_embeddings and "head" not in params
  tokens = np.random.default_rng(1).integers(0, 101, (2, 15))
  assert_rel_close(parity.seqmix_logits(cfg, params, tokens), parity.hf_logits(hf, tokens),
                   parity.LOGIT_RTOL, "tied llama with biases")


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0}])
def test_llama_rope_scaling_is_refused_naming_supported_types(scaling):
  hf = {**_config().to_dict(), "rope_parameters": {**scaling, "rope_theta": 1e4}}
  with pytest.raises(NotImplementedError, match=r"rope_type='(linear|llama3)'.*\['default'\]"):
    convert.config_from_hf(hf)


def test_llama_legacy_rope_theta_field():
  hf = _config().to_dict()
  hf.pop("rope_parameters")
  hf["rope_theta"] = 1234.0
  assert convert.config_from_hf(hf).mixer_kwargs["mha"]["rope_base"] == 1234.0


def test_llama_gqa_mismatch_names_the_tensor(tmp_path):
  hf = parity.make_hf(transformers.LlamaForCausalLM, _config())
  hf.save_pretrained(tmp_path)
  cfg = convert.common.read_json(os.path.join(tmp_path, "config.json"))
  cfg["num_key_value_heads"] = 4  # the checkpoint has 2
  convert.common.write_json(cfg, os.path.join(tmp_path, "config.json"))
  with pytest.raises(convert.TensorMismatch, match=r"'model.layers.0.self_attn.k_proj.weight': "
                     r"expected shape \(40, 40\), found shape \(20, 40\)"):
    convert.from_hf(str(tmp_path), progress=False)
