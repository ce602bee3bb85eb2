"""Shared checks of the converter tests: a tiny random `transformers` model against seqmix.

Each family test builds its model with transformers' own config class, saves it with
save_pretrained, converts the directory, and calls `check_family`:
  1. logits of the full forward agree (float32, ‖Δ‖/‖ref‖ <= 1e-4);
  2. greedy continuations of 32 tokens with caches (HF `generate`, seqmix `generate`) agree;
  3. HF -> seqmix -> HF -> seqmix is the identity on params, and the exported directory loads
     into transformers with the same logits;
  4. params with seqmix's own init tree (and new values) exported to HF give transformers the
     logits seqmix computes.
"""

import os

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from seqmix import convert  # noqa: E402
from seqmix.convert import common  # noqa: E402
from seqmix.models import generate as generate_lib  # noqa: E402
from seqmix.models import lm  # noqa: E402
from seqmix.testing import assert_rel_close  # noqa: E402

torch.set_num_threads(1)
# float32 parity: the HF run is float32; 1e-4 relative leaves room for summation order only.
LOGIT_RTOL = 1e-4
NEW_TOKENS = 32


def make_hf(model_cls, config, seed: int = 0):
  torch.manual_seed(seed)
  model = model_cls(config).eval().float()
  model.generation_config.eos_token_id = None  # greedy continuations run the full 32 tokens
  model.generation_config.pad_token_id = 0
  return model


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompts) -> np.ndarray:
  ids = torch.as_tensor(np.asarray(prompts), dtype=torch.long)
  with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
  return out[:, ids.shape[1]:].numpy()


_JITTED = {}


def _jitted(cfg):
  """One compiled apply per config (the checks reuse it across params)."""
  key = repr(sorted(cfg.to_dict().items()))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lm.from_config(cfg).apply)
  return _JITTED[key]


def seqmix_logits(cfg, params, tokens) -> np.ndarray:
  logits, _ = _jitted(cfg)({"params": params}, np.asarray(tokens, np.int32))
  return np.asarray(logits)


def params_equal(a, b):
  fa, fb = common.flatten(common.unbox(a)), common.flatten(common.unbox(b))
  assert sorted(fa) == sorted(fb), (sorted(set(fa) ^ set(fb)))
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def check_family(hf_model, tmp_path, vocab: int, *, seq_len: int = 20, prompt_len: int = 7):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (2, seq_len))
  hf_dir, out_dir = os.path.join(tmp_path, "hf"), os.path.join(tmp_path, "hf_out")
  hf_model.save_pretrained(hf_dir)

  cfg, params = convert.from_hf(hf_dir, progress=False)
  want = hf_logits(hf_model, tokens)
  assert_rel_close(seqmix_logits(cfg, params, tokens), want, LOGIT_RTOL, "logits vs HF")

  prompts = tokens[:, :prompt_len]
  ours, _ = generate_lib.generate(lm.from_config(cfg), params, prompts.tolist(),
                                  max_new_tokens=NEW_TOKENS, greedy=True)
  theirs = hf_greedy(hf_model, prompts)
  np.testing.assert_array_equal(np.asarray(ours), theirs, err_msg="greedy continuation vs HF")

  convert.to_hf(cfg, params, out_dir, progress=False)
  cfg2, params2 = convert.from_hf(out_dir, progress=False)
  params_equal(params, params2)
  assert cfg2.to_dict() == cfg.to_dict()
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
  np.testing.assert_allclose(hf_logits(reloaded, tokens), want, rtol=0, atol=0)

  # seqmix params -> HF: the converted tree is exactly the tree seqmix's init builds (checked
  # by shapes, without compiling init), and new values in it (not from any HF model) give
  # transformers the logits seqmix computes.
  shapes = jax.eval_shape(lambda: nn.unbox(
      lm.from_config(cfg).init(jax.random.key(1), tokens[:, :4])["params"]))
  flat = lambda tree: {k: (tuple(v.shape), np.dtype(v.dtype))
                       for k, v in traverse_util.flatten_dict(dict(tree)).items()}
  assert flat(shapes) == flat(params)
  noise = np.random.default_rng(1)
  init = jax.tree.map(lambda x: (x + 0.1 * noise.standard_normal(x.shape)).astype(x.dtype), params)
  init_dir = os.path.join(tmp_path, "from_seqmix")
  convert.to_hf(cfg, init, init_dir, progress=False)
  theirs = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(init_dir).eval(), tokens)
  assert_rel_close(seqmix_logits(cfg, init, tokens), theirs, LOGIT_RTOL, "seqmix init vs HF")
  params_equal(init, convert.from_hf(init_dir, progress=False)[1])
  return cfg, params
