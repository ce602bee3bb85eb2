"""RecurrentGemma: transformers' RecurrentGemmaForCausalLM <-> seqmix hawk / local_mqa pattern
(RG-LRU, conv taps reversed, local MQA with half-rotary RoPE, (1 + w) RMSNorm, GeGLU MLP,
bf16(√D) embedding scale, logit soft cap)."""

import numpy as np

from tests.convert import parity

transformers = parity.transformers
convert = parity.convert


def _config(**kw):
  # 2 layers: one recurrent block, one local attention block whose window (6) is shorter than
  # the 7 + 32 tokens decoded, so the ring buffer wraps.
  base = dict(vocab_size=79, hidden_size=24, lru_width=24, intermediate_size=2 * 22,
              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              attention_window_size=6, block_types=["recurrent", "attention"],
              logits_soft_cap=3.0, rms_norm_eps=1e-6, initializer_range=0.2,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
  return transformers.RecurrentGemmaConfig(**{**base, **kw})


def _randomise_norms_and_biases(hf):
  """transformers initialises (1 + w) norms to w = 0 and biases to 0: make them count."""
  gen = parity.torch.Generator().manual_seed(0)
  with parity.torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.copy_(0.3 * parity.torch.randn(p.shape, generator=gen))


def test_recurrent_gemma_parity_and_round_trip(tmp_path):
  hf = parity.make_hf(transformers.RecurrentGemmaForCausalLM, _config())
  _randomise_norms_and_biases(hf)
  cfg, _ = parity.check_family(hf, str(tmp_path), vocab=79)
  assert cfg.mixer == "hawk,local_mqa" and cfg.norm == "rmsnorm_1p" and cfg.logit_softcap == 3.0
  assert cfg.mixer_kwargs["local_mqa"]["window"] == 6
