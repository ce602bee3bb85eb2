"""experiments.hf_perplexity: seqmix's and transformers' perplexities of one converted model."""

import numpy as np
import pytest

from experiments import hf_perplexity


def test_windows_cut_whole_windows_and_refuse_short_texts():
  w = hf_perplexity.windows(np.arange(25), 8, max_tokens=20)
  np.testing.assert_array_equal(w, np.arange(16).reshape(2, 8))
  with pytest.raises(ValueError, match="fewer than seq_len=8"):
    hf_perplexity.windows(np.arange(5), 8)


def test_nll_is_the_cross_entropy():
  logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
  s, n = hf_perplexity._nll(logits, np.array([[0, 1]]))
  assert n == 1 and s == pytest.approx(-np.log(0.25))


def test_perplexities_agree_on_a_tiny_random_llama(tmp_path):
  from tests.convert import parity
  transformers = parity.transformers
  hf = parity.make_hf(transformers.LlamaForCausalLM, transformers.LlamaConfig(
      vocab_size=53, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3, bos_token_id=None,
      eos_token_id=None, pad_token_id=None))
  hf.save_pretrained(tmp_path)
  tokens = hf_perplexity.windows(np.random.default_rng(0).integers(0, 53, 70), 16)
  ours, theirs = hf_perplexity.perplexities(str(tmp_path), tokens, batch=3)
  assert 1.0 < theirs and abs(ours - theirs) / theirs < 1e-5
