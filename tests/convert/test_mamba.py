"""Mamba: transformers' MambaForCausalLM <-> seqmix's mamba mixer (conv taps reversed,
x_proj split into dt / B / C, dt_proj + bias, A_log, D)."""

import numpy as np

from seqmix.convert import common
from tests.convert import parity

transformers = parity.transformers


def _config(**kw):
  base = dict(vocab_size=89, hidden_size=24, state_size=6, num_hidden_layers=2, expand=2,
              conv_kernel=3, time_step_rank=5, initializer_range=0.2, tie_word_embeddings=True,
              use_mambapy=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  return transformers.MambaConfig(**{**base, **kw})


def test_mamba_parity_and_round_trip(tmp_path):
  hf = parity.make_hf(transformers.MambaForCausalLM, _config())
  cfg, params = parity.check_family(hf, str(tmp_path), vocab=89)
  mk = cfg.mixer_kwargs["mamba"]
  assert (mk["d_state"], mk["d_conv"], mk["expand"], mk["dt_rank"]) == (6, 3, 2, 5)
  w = hf.backbone.layers[0].mixer.conv1d.weight.detach().numpy()      # [E, 1, L]
  k = np.asarray(params["block_0"]["mixer"]["conv1d"]["kernel"])       # [L, E]
  np.testing.assert_array_equal(k[0], w[:, 0, -1])  # seqmix's first tap = torch's last


def test_conv_tap_order_round_trips():
  w = np.arange(2 * 1 * 3, dtype=np.float32).reshape(2, 1, 3)
  k = common.torch_conv_to_taps(w)
  np.testing.assert_array_equal(k, [[2, 5], [1, 4], [0, 3]])
  np.testing.assert_array_equal(common.taps_to_torch_conv(k), w)


def test_mamba_biases_untied_no_conv_bias_logits(tmp_path):
  hf = parity.make_hf(transformers.MambaForCausalLM, _config(
      use_bias=True, use_conv_bias=False, tie_word_embeddings=False, num_hidden_layers=1))
  with parity.torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("proj.bias") and "dt_proj" not in name:
        p.normal_(0.0, 0.3)
  hf.save_pretrained(tmp_path)
  cfg, params = parity.convert.from_hf(str(tmp_path), progress=False)
  assert "bias" not in params["block_0"]["mixer"]["conv1d"] and "head" in params
  tokens = np.random.default_rng(2).integers(0, 89, (2, 13))
  parity.assert_rel_close(parity.seqmix_logits(cfg, params, tokens),
                          parity.hf_logits(hf, tokens), parity.LOGIT_RTOL, "mamba with biases")
