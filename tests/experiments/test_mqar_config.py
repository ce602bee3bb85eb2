"""experiments/configs/mqar.py: per-mixer settings that the zoology setting needs."""

from experiments.configs import mqar


def test_cosformer_horizon_is_the_sequence_length():
  # The paper's M is the sequence length; the mixer's 2048 default would make the re-weighting
  # nearly constant at T <= 512.
  for t in (64, 256):
    c = mqar.get_config(f"mixer=cosformer,T={t},d=128")
    assert c.model.mixer_kwargs["cosformer"]["max_len"] == t


def test_head_counts_are_fitted_to_the_width():
  c = mqar.get_config("mixer=hedgehog,T=256,d=128")
  assert c.model.mixer_kwargs["hedgehog"]["num_heads"] == 8      # default 12 does not divide 128
  assert not dict(mqar.get_config("mixer=retnet,T=256,d=128").model.mixer_kwargs)
