"""The registry: lookups, errors, patterns, metadata completeness."""

import pytest

from seqmix import registry


def test_unknown_name_lists_valid_and_closest():
  names = registry.names()
  if not names:
    pytest.skip("no mixers registered yet")
  wrong = names[0] + "x"
  with pytest.raises(KeyError) as e:
    registry.get(wrong)
  msg = str(e.value)
  assert f"Did you mean {names[0]!r}" in msg
  assert "Registered mixers:" in msg


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
  names = registry.names(include_patterns=False)
  if len(names) < 2:
    pytest.skip("needs two mixers")
  a, b = names[:2]
  assert registry.expand_pattern(f"{a},{a},{b}", 5) == [a, a, b, a, a]
  with pytest.raises(ValueError):
    registry.expand_pattern(" , ", 2)


def test_pattern_state_is_constant_only_when_every_member_is():
  for name in registry.names():
    info = registry.get(name)
    if info.pattern:
      assert info.constant_state == all(registry.get(m).constant_state for m in info.pattern)
  if "xlstm" in registry.names():
    assert registry.get("xlstm").constant_state          # mLSTM and sLSTM: fixed-size states
  if "griffin" in registry.names():
    assert not registry.get("griffin").constant_state    # local MQA keeps a window cache
