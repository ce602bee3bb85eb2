"""seqmix.convert.common: the checked reader, local safetensors (sharded, bfloat16), errors."""

import numpy as np
import pytest

from seqmix import convert
from seqmix.convert import common


def test_reader_names_missing_wrong_and_leftover_tensors():
  r = common.TensorReader({"a": np.zeros((2, 3)), "b": np.zeros(4), "x.inv_freq": np.zeros(1)},
                          ignore=(".inv_freq",), progress=False)
  with pytest.raises(convert.TensorMismatch, match=r"'a': expected shape \(3, 2\), found shape "
                                                   r"\(2, 3\)"):
    r.take("a", (3, 2))
  with pytest.raises(convert.TensorMismatch, match=r"'c' is missing.*expected shape \(5,\)"):
    r.take("c", (5,))
  assert r.take("a", (2, 3)).shape == (2, 3)
  with pytest.raises(convert.TensorMismatch, match=r"1 tensor\(s\).*\['b'\]"):
    r.finish()


def test_unknown_family_names_the_supported_ones():
  with pytest.raises(NotImplementedError, match=r"'rwkv6' \(RWKV-6 has no converter yet\).*"
                                                r"\['gpt2', 'llama', 'mamba'"):
    convert.config_from_hf({"model_type": "rwkv6"})


def test_missing_weights_say_local_files_only(tmp_path):
  with pytest.raises(FileNotFoundError, match="reads local files only"):
    common.load_state_dict(str(tmp_path))


def test_flatten_unflatten_round_trip():
  tree = {"a": {"b": np.ones(2), "c": {"d": np.zeros(1)}}, "e": np.arange(3)}
  flat = common.flatten(tree)
  assert sorted(flat) == ["a/b", "a/c/d", "e"]
  back = common.unflatten(flat)
  np.testing.assert_array_equal(back["a"]["c"]["d"], tree["a"]["c"]["d"])


def test_sharded_and_bfloat16_checkpoints(tmp_path):
  from tests.convert import parity
  torch, transformers = parity.torch, parity.transformers
  hf = parity.make_hf(transformers.GPT2LMHeadModel, transformers.GPT2Config(
      vocab_size=61, n_embd=12, n_layer=2, n_head=2, n_positions=16, bos_token_id=None,
      eos_token_id=None))
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="8KB")
  assert (tmp_path / "sharded" / common.HF_INDEX).exists()
  want = {k: v.detach().numpy() for k, v in hf.state_dict().items() if not k.endswith(".attn.bias")}
  got = common.load_state_dict(str(tmp_path / "sharded"), progress=False)
  assert set(want) - {"lm_head.weight"} == set(got)
  for k, v in got.items():
    np.testing.assert_array_equal(v, want[k])
  hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  cfg, params = convert.from_hf(str(tmp_path / "bf16"), progress=False)
  emb = params["embed"]["embedding"]
  assert str(emb.dtype) == "bfloat16"
  ref = hf.transformer.wte.weight.detach().float().numpy()
  np.testing.assert_array_equal(emb.astype(np.float32), ref)
