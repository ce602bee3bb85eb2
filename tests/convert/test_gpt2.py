"""GPT-2: transformers' GPT2LMHeadModel <-> seqmix (learned positions, gelu_new, fused c_attn)."""

import os

import numpy as np
import pytest

from tests.convert import parity

transformers = parity.transformers

from seqmix import convert  # noqa: E402


def _config(**kw):
  base = dict(vocab_size=97, n_embd=36, n_layer=2, n_head=3, n_positions=64, n_inner=52,
              initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  return transformers.GPT2Config(**{**base, **kw})


def test_gpt2_parity_and_round_trip(tmp_path):
  hf = parity.make_hf(transformers.GPT2LMHeadModel, _config())
  cfg, _ = parity.check_family(hf, str(tmp_path), vocab=97)
  assert cfg.mlp == "gelu_tanh" and cfg.pos_embedding == "learned" and cfg.tie_embeddings


def test_gpt2_wrong_shape_names_the_tensor(tmp_path):
  hf = parity.make_hf(transformers.GPT2LMHeadModel, _config())
  hf.save_pretrained(tmp_path)
  cfg = convert.common.read_json(os.path.join(tmp_path, "config.json"))
  cfg["n_inner"] = 50  # the checkpoint's MLP is 52 wide
  convert.common.write_json(cfg, os.path.join(tmp_path, "config.json"))
  with pytest.raises(convert.TensorMismatch,
                     match=r"'transformer.h.0.mlp.c_fc.weight': expected shape \(36, 50\), "
                           r"found shape \(36, 52\)"):
    convert.from_hf(str(tmp_path), progress=False)


def test_gpt2_unknown_activation_is_refused():
  with pytest.raises(NotImplementedError, match="activation_function='relu'.*supported"):
    convert.config_from_hf({**_config().to_dict(), "activation_function": "relu"})


def test_cli_round_trip(tmp_path):
  from seqmix.convert.__main__ import main
  hf = parity.make_hf(transformers.GPT2LMHeadModel, _config(n_layer=1))
  hf.save_pretrained(tmp_path / "hf")
  assert main(["--from", "hf", "--path", str(tmp_path / "hf"), "--to", str(tmp_path / "sm"),
               "--no-progress"]) == 0
  assert main(["--from", "seqmix", "--path", str(tmp_path / "sm"), "--to",
               str(tmp_path / "hf2"), "--no-progress"]) == 0
  tokens = np.arange(10)[None] % 97
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
  np.testing.assert_array_equal(parity.hf_logits(back, tokens), parity.hf_logits(hf, tokens))
