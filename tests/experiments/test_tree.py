"""experiments/tree.py and experiments/mixer_facts.py: the family tree builds from the registry."""

import pytest

from experiments import mixer_facts
from experiments import tree
from seqmix import registry


def test_tree_writes_png_and_svg_with_every_mixer(tmp_path):
  png, svg = tree.render(str(tmp_path / "out"))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  text = open(svg, encoding="utf-8").read()
  assert text.lstrip().startswith("<?xml") and "</svg>" in text
  names = registry.names() + list(registry.EXTERNAL_ANCESTORS)
  absent = [n for n in names if f">{n}<" not in text]
  assert not absent, f"nodes missing from the SVG: {absent}"


def test_layout_puts_each_node_in_its_year_and_lane():
  nodes = mixer_facts.lineage()
  xy, years, lanes = tree.layout(nodes)
  assert set(xy) == set(nodes)
  assert years == sorted(years) and years[0] == 1990 and years[-1] == 2025
  lane = {f: (top, bottom) for f, top, bottom in lanes}
  for n in nodes.values():
    x, y = xy[n.name]
    assert x == years.index(n.year) * tree._COL_W, n  # pylint: disable=protected-access
    assert lane[n.family][1] < y < lane[n.family][0], n
    for p in n.parents:
      assert xy[p][0] <= x, (p, n.name)
  assert len(set(xy.values())) == len(xy), "two nodes share a position"


def test_status_comes_from_the_op_tables():
  nodes = mixer_facts.lineage()
  # Hand-written from the ops' impl tables: gla, linear_scan, selective_scan and attention
  # have a Pallas form, and delta_rule (deltanet, gated_deltanet); mlstm, ttt, rwkv4 and the SSM
  # kernels have none.
  assert nodes["gla"].kernel == ("linear_attention.gla",)
  assert nodes["mamba"].kernel == ("ssm.selective_scan",)
  assert nodes["hawk"].kernel == ("scan.linear_scan",)
  assert nodes["based"].kernel == ("linear_attention.gla", "attention.attention")
  assert nodes["deltanet"].kernel == ("delta_rule.delta_rule",)
  assert nodes["gated_deltanet"].kernel == ("delta_rule.delta_rule",)
  for name in ("mlstm", "ttt_linear", "rwkv4", "s4", "dss"):
    assert nodes[name].kernel == (), name
  assert nodes["lstm"].external and not nodes["lstm"].tested
  assert all(nodes[n].tested for n in registry.names())
  assert nodes["griffin"].pattern and not nodes["hawk"].pattern


def test_op_strings_parse():
  assert mixer_facts.op_tokens("ssm_kernels.s4d_kernel + conv.causal_conv; scan.linear_scan "
                               "(decode)") == ["ssm_kernels.s4d_kernel", "conv.causal_conv"]
  assert mixer_facts.op_tokens("a.b; scan.linear_scan (decode)", decode=True) == [
      "a.b", "scan.linear_scan"]
  with pytest.raises(ValueError, match="has no function 'glaa'"):
    mixer_facts.built_impls("linear_attention.glaa")
  with pytest.raises(ValueError, match="no module seqmix.ops.nope"):
    mixer_facts.built_impls("nope.x")
  for name in registry.names():  # every registry op string names real ops
    for t in mixer_facts.op_tokens(registry.get(name).op, decode=True):
      mixer_facts.built_impls(t)


def test_render_refuses_a_broken_lineage(tmp_path):
  registry.names()
  try:
    registry.register("test_only_mixer", paper="t", year=2024, venue="t", family="ssm",
                      op="none", parents=("nope",))(object)
    with pytest.raises(ValueError, match="parent 'nope' is neither"):
      tree.render(str(tmp_path))
  finally:
    registry._REGISTRY.pop("test_only_mixer", None)  # pylint: disable=protected-access
