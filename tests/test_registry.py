"""The registry: lookups, errors, patterns, metadata completeness.

Expected values are written out by hand (not recomputed with the registry's own difflib or
`all(...)` formula), so a wrong suggestion, expansion or pattern state fails here.
"""

import re

import pytest

from seqmix import registry

# The registered layer patterns and their decoding state: hawk and local_mqa keep a window
# KV cache (griffin), mLSTM and sLSTM fixed-size states (xlstm); samba_swa a window KV cache.
PATTERN_CONSTANT_STATE = {"griffin": False, "xlstm": True, "samba": False,
                          "jamba": False, "mamba2_hybrid": False, "zamba": False}


@pytest.mark.parametrize("wrong, closest", [("mhaa", "mha"), ("retnett", "retnet"),
                                            ("Mamba2", "mamba2"), ("griffen", "griffin"),
                                            ("xlstn", "xlstm")])
def test_unknown_name_suggests_the_closest(wrong, closest):
  with pytest.raises(KeyError) as e:
    registry.get(wrong)
  msg = str(e.value)
  assert f"Did you mean {closest!r}?" in msg
  assert "Registered mixers:" in msg and ", gla, " in msg and ", xlstm" in msg


def test_unknown_name_without_a_close_match_suggests_nothing():
  with pytest.raises(KeyError) as e:
    registry.get("qqqqqqqqqq")
  assert "Did you mean" not in str(e.value) and "Registered mixers: " in str(e.value)


def test_metadata_complete():
  for name in registry.names():
    info = registry.get(name)
    assert info.paper and info.venue and info.op, name
    assert info.family in registry.FAMILIES, name
    if info.is_pattern:
      for p in info.pattern:
        assert not registry.get(p).is_pattern, (name, p)
    else:
      assert info.cls is not None, name


def test_expand_pattern_repeats_over_depth():
  assert registry.expand_pattern("mha,mha,gla", 5) == ["mha", "mha", "gla", "mha", "mha"]
  assert registry.expand_pattern(" gla , mha ", 3) == ["gla", "mha", "gla"]
  assert registry.expand_pattern("retnet", 2) == ["retnet", "retnet"]
  assert registry.expand_pattern("griffin", 4) == ["hawk", "hawk", "local_mqa", "hawk"]
  assert registry.expand_pattern("gla,griffin", 6) == ["gla", "hawk", "hawk", "local_mqa",
                                                       "gla", "hawk"]
  assert registry.expand_pattern("xlstm", 10) == ["mlstm"] * 7 + ["slstm"] + ["mlstm"] * 2
  with pytest.raises(ValueError, match="Empty mixer spec"):
    registry.expand_pattern(" , ", 2)
  with pytest.raises(KeyError, match="Did you mean 'gla'"):
    registry.expand_pattern("mha,glaa", 2)


def test_registered_patterns_and_their_state():
  patterns = {n: registry.get(n) for n in registry.names() if registry.get(n).is_pattern}
  assert {n: i.constant_state for n, i in patterns.items()} == PATTERN_CONSTANT_STATE, (
      "a pattern was added or changed: write its expected constant_state here by hand")
  assert patterns["griffin"].pattern == ("hawk", "hawk", "local_mqa")
  assert patterns["xlstm"].pattern == ("mlstm",) * 7 + ("slstm",)
  assert "griffin" not in registry.names(include_patterns=False)


@pytest.mark.parametrize("members, constant", [(("gla", "hawk"), True), (("mlstm",), True),
                                               (("gla", "mha"), False),
                                               (("local_mqa", "hawk"), False)])
def test_register_pattern_state(members, constant):
  """A new pattern's constant_state: True only when every member's is (hand-written)."""
  registry.names()  # load every real mixer first
  name = "test_only_pattern"
  try:
    registry.register_pattern(name, members, paper="test", year=2024, venue="tests", op="none")
    assert registry.get(name).constant_state is constant
    assert registry.get(name).pattern == members
  finally:
    registry._REGISTRY.pop(name, None)  # pylint: disable=protected-access


def test_register_pattern_needs_registered_members():
  with pytest.raises(ValueError, match=r"register \['nope'\] before the pattern"):
    registry.register_pattern("test_only_pattern", ("gla", "nope"), paper="test", year=2024,
                              venue="tests", op="none")
  assert "test_only_pattern" not in registry.names()


# Lineage edges the family tree must show (the examples), written out by hand.
EXPECTED_EDGES = [("linear_transformer", "retnet"), ("retnet", "gla"), ("gla", "gated_deltanet"),
                  ("deltanet", "gated_deltanet"), ("mamba2", "gated_deltanet"),
                  ("s4", "s4d"), ("s4d", "mamba"), ("mamba", "mamba2"), ("lru", "hawk"),
                  ("hawk", "griffin"), ("rwkv4", "rwkv6"), ("lstm", "slstm"),
                  ("lstm", "mlstm"), ("mlstm", "xlstm"), ("slstm", "xlstm")]
# The architectures with no parents: a new mixer must name what it builds on.
# The roots of the family tree: attention, recurrence, fast weights, continuous-time memory,
# dilated causal convolution (the long-conv lane) and structured matrices (Monarch, M2).
ROOTS = {"mha", "rnn", "fast_weights", "hippo", "wavenet", "monarch"}


def _parents(name):
  if name in registry.EXTERNAL_ANCESTORS:
    return registry.EXTERNAL_ANCESTORS[name].parents
  return registry.get(name).parents


def test_lineage_is_sound():
  assert registry.lineage_errors() == []
  missing = [(p, c) for p, c in EXPECTED_EDGES if p not in _parents(c)]
  assert not missing, f"lineage edges lost: {missing}"
  everything = set(registry.names()) | set(registry.EXTERNAL_ANCESTORS)
  assert {n for n in everything if not _parents(n)} == ROOTS
  for a in registry.EXTERNAL_ANCESTORS.values():
    assert a.family in registry.FAMILIES and a.paper and 1900 < a.year < 2100, a
  used = {p for n in everything for p in _parents(n)}
  unused = set(registry.EXTERNAL_ANCESTORS) - used
  assert not unused, f"external ancestors no mixer descends from: {unused}"


@pytest.mark.parametrize("parents, year, message", [
    (("glaa",), 2024, r"parent 'glaa' is neither a registered mixer nor in "
                      r"registry.EXTERNAL_ANCESTORS \(did you mean 'gla'\?\)"),
    (("gated_deltanet",), 2024, r"\(2024\) lists 'gated_deltanet' \(2025\) as a parent, but "
                                r"the parent is younger"),
    (("test_only_mixer",), 2024, r"'test_only_mixer' lists itself as a parent"),
    (("lstm", "mamba2"), 2024, None),
])
def test_lineage_errors_name_the_bad_parent(parents, year, message):
  registry.names()  # load every real mixer first
  name = "test_only_mixer"
  try:
    registry.register(name, paper="test", year=year, venue="tests", family="ssm", op="none",
                      parents=parents)(object)
    errors = registry.lineage_errors()
    if message is None:
      assert errors == []
    else:
      assert len(errors) == 1 and errors[0].startswith(f"{name!r}"), errors
      assert re.search(message, errors[0]), errors
  finally:
    registry._REGISTRY.pop(name, None)  # pylint: disable=protected-access
