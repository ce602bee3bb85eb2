"""experiments/train.py end to end (in-process) and the config errors users see."""

import os
import sys
import urllib.error

import pytest
from absl import flags

from experiments import train as train_cli
from experiments.configs import mqar as mqar_config
from experiments.configs import shakespeare_char as sc_config
from seqmix import registry
from seqmix.data import corpora
from seqmix.train import loop
from seqmix.train.config import ConfigError

needs_mha = pytest.mark.skipif("mha" not in registry.names(), reason="mha not registered")


def _reset_flags():
  # Each parse of --config registers one flag per --config.* override; drop them so the
  # next in-process parse can register its own.
  flags.FLAGS.unparse_flags()
  for name in list(flags.FLAGS):
    if name.startswith("config."):
      delattr(flags.FLAGS, name)


def _parse(argv, monkeypatch):
  # ml_collections reads --config.* overrides from sys.argv, as under `python -m`.
  monkeypatch.setattr(sys, "argv", argv)
  _reset_flags()
  flags.FLAGS(argv)


def _cli(args, capsys, monkeypatch):
  _parse(["train"] + args, monkeypatch)
  try:
    train_cli.main(["train"])
  finally:
    _reset_flags()
  return capsys.readouterr().out


@needs_mha
@pytest.mark.parametrize("config", [
    "mqar.py:mixer=mha,smoke",
    # ~40 s on CI's cores (whole 111k-char validation split + sampling): full suite only.
    pytest.param("shakespeare_char.py:mixer=mha,smoke", marks=pytest.mark.slow)])
def test_smoke_config_trains_via_cli(config, tmp_path, capsys, monkeypatch, request):
  if config.startswith("shakespeare"):
    # Finds the corpus through $SEQMIX_DATA_DIR; skips without it, fails when CI is set.
    request.getfixturevalue("tinyshakespeare_path")
  path = os.path.join(os.path.dirname(mqar_config.__file__), config)
  out = _cli([f"--config={path}", "--config.train.steps=6", "--config.train.decay_steps=6",
              "--config.train.ckpt_every=3", "--config.train.progress=False",
              f"--workdir={tmp_path}"], capsys, monkeypatch)
  assert "done: step 6" in out
  assert sorted(os.listdir(tmp_path / "checkpoints" / "latest")) == ["3", "6"]


def test_cli_rejects_unknown_override(tmp_path, monkeypatch):
  path = mqar_config.__file__ + ":smoke"
  try:
    with pytest.raises(Exception, match="lerning_rate"):
      _parse(["train", f"--config={path}", "--config.train.lerning_rate=1",
              f"--workdir={tmp_path}"], monkeypatch)
  finally:
    _reset_flags()


def test_misspelled_train_field(tmp_path):
  c = mqar_config.get_config("smoke")
  c.train.warmup_step = 5  # the file itself misspells a field
  with pytest.raises(ConfigError, match="Unknown field train.warmup_step.*'warmup_steps'"):
    loop.train(c, str(tmp_path))


@needs_mha
def test_misspelled_model_field(tmp_path):
  c = mqar_config.get_config("smoke")
  c.model.n_layer = 3
  with pytest.raises(ConfigError, match="Unknown field model.n_layer.*'n_layers'"):
    loop.train(c, str(tmp_path))


@needs_mha
def test_width_not_divisible_by_heads(tmp_path):
  c = mqar_config.get_config("smoke")
  c.model.d_model = 30
  c.model.mixer_kwargs = {"mha": {"num_heads": 4, "position": "none"}}
  with pytest.raises(ConfigError, match=r"model.d_model=30 must be divisible by "
                     r"model.mixer_kwargs.mha.num_heads=4"):
    loop.train(c, str(tmp_path))


def test_unknown_mixer(tmp_path):
  c = mqar_config.get_config("mixer=mhaa,smoke")
  with pytest.raises(ConfigError, match="Unknown mixer 'mhaa'.*Registered mixers"):
    loop.train(c, str(tmp_path))


@needs_mha
@pytest.mark.parametrize("data_dir", ["unset", "empty"])
def test_missing_corpus_names_seqmix_data_dir(data_dir, tmp_path, monkeypatch):
  if data_dir == "unset":
    monkeypatch.delenv("SEQMIX_DATA_DIR", raising=False)
  else:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("SEQMIX_DATA_DIR", str(tmp_path / "empty"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

  def offline(*a, **k):
    raise urllib.error.URLError("offline (test)")
  monkeypatch.setattr(corpora, "_fetch", offline)
  with pytest.raises(Exception, match="SEQMIX_DATA_DIR") as err:
    loop.train(sc_config.get_config("smoke"), str(tmp_path / "run"))
  assert not isinstance(err.value, ConfigError)  # the data module's own message
  assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training
