"""Mamba2: transformers' Mamba2ForCausalLM <-> seqmix's mamba2 mixer ([z, xBC, dt] in_proj,
conv taps reversed, B/C groups, transformers' whole-width gated norm)."""

import math

import numpy as np
import pytest

from tests.convert import parity

transformers = parity.transformers
convert = parity.convert


def _config(**kw):
  # E = 2·20 = 40 = 5 heads of 8; chunk_size 8 < T, so HF's and seqmix's chunked scans both
  # carry state across chunks.
  base = dict(vocab_size=83, hidden_size=20, expand=2, num_heads=5, head_dim=8, n_groups=1,
              state_size=6, num_hidden_layers=2, conv_kernel=4, chunk_size=8,
              initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
  return transformers.Mamba2Config(**{**base, **kw})


def test_mamba2_parity_and_round_trip(tmp_path):
  hf = parity.make_hf(transformers.Mamba2ForCausalLM, _config())
  cfg, _ = parity.check_family(hf, str(tmp_path), vocab=83)
  mk = cfg.mixer_kwargs["mamba2"]
  assert (mk["headdim"], mk["ngroups"], mk["d_state"], mk["norm_groups"]) == (8, 1, 6, 1)


def test_mamba2_groups_and_biases_logits(tmp_path):
  """n_groups=2 (heads 0-2 read group 0 ... as transformers repeats groups), in/out biases."""
  hf = parity.make_hf(transformers.Mamba2ForCausalLM, _config(
      num_heads=4, head_dim=10, n_groups=2, use_bias=True, tie_word_embeddings=True,
      num_hidden_layers=1))
  with parity.torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("proj.bias"):
        p.normal_(0.0, 0.3)
  hf.save_pretrained(tmp_path)
  cfg, params = convert.from_hf(str(tmp_path), progress=False)
  tokens = np.random.default_rng(3).integers(0, 83, (2, 19))
  parity.assert_rel_close(parity.seqmix_logits(cfg, params, tokens),
                          parity.hf_logits(hf, tokens), parity.LOGIT_RTOL, "mamba2 G=2, biases")


def test_mamba2_time_step_limit_is_refused():
  hf = {**_config().to_dict(), "time_step_limit": [0.0, 0.1]}
  with pytest.raises(NotImplementedError, match=r"time_step_limit=\[0.0, 0.1\]"):
    convert.config_from_hf(hf)
  assert convert.config_from_hf({**hf, "time_step_limit": [0.0, math.inf]}).mixer == "mamba2"


def test_mamba2_grouped_norm_export_is_refused():
  cfg = convert.config_from_hf(_config(num_heads=4, head_dim=10, n_groups=2).to_dict())
  cfg.mixer_kwargs["mamba2"]["norm_groups"] = None  # mamba_ssm's per-group norm
  with pytest.raises(ValueError, match="normalises the whole inner width"):
    convert.FAMILIES["mamba2"].config_to_hf(cfg)
