"""The family tree of every registered mixer, drawn from the registry's metadata.

  python -m experiments.tree [--out=out/tree]

Writes family_tree.png and family_tree.svg to --out. Each registered mixer and each external
ancestor (`registry.EXTERNAL_ANCESTORS`) is a node placed by its year (columns, one per year
that has a node, so not to scale) in the lane of its family; an arrow runs from each entry
of its `parents` to it. Filled nodes are registered (and so run by the shared protocol
tests); hollow ones are ancestors seqmix does not implement. A star marks a mixer whose op
has a built Pallas impl (the op module's impl table), a diamond one registered as
sequence-parallel. Nothing here is written by hand: a new mixer appears once it registers.
"""

import collections
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import lines as mlines  # pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import patches  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import mixer_facts  # pylint: disable=g-import-not-at-top,wrong-import-position
from seqmix import registry  # pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string("out", os.path.join("out", "tree"), "Output folder.")

# Lanes top to bottom, ordered so that most parent -> child arrows join neighbouring lanes.
LANE_ORDER = ("ttt", "linear-attention", "attention", "mlp-mixer", "long-conv", "memory",
              "hybrid", "nonlinear-rnn", "linear-rnn", "ssm")
FAMILY_COLOURS = {
    "attention": "#d62728", "linear-attention": "#1f77b4", "ssm": "#2ca02c",
    "linear-rnn": "#ff7f0e", "nonlinear-rnn": "#8c564b", "ttt": "#9467bd",
    "long-conv": "#17becf", "memory": "#bcbd22", "hybrid": "#e377c2",
    "mlp-mixer": "#7f7f7f"}
_COL_W = 1.0      # data units between year columns
_ROW_H = 1.0      # data units between nodes stacked in one lane
_LANE_GAP = 0.6   # extra space between lanes


def layout(nodes: dict[str, mixer_facts.Node]):
  """Positions of the nodes.

  Returns (xy: name -> (x, y), years: the column years in order, lanes: [(family, y_top,
  y_bottom)] top to bottom). Within a lane and year, nodes are ordered by the mean height of
  their already placed parents (older columns first), which keeps arrows short and mostly
  uncrossed; ties by name, so the drawing is deterministic.
  """
  missing = sorted({n.family for n in nodes.values()} - set(LANE_ORDER))
  if missing:
    raise ValueError(f"families {missing} have no lane: add them to LANE_ORDER.")
  years = sorted({n.year for n in nodes.values()})
  col = {y: i for i, y in enumerate(years)}
  cells = collections.defaultdict(list)
  for n in nodes.values():
    cells[(n.family, n.year)].append(n.name)
  families = [f for f in LANE_ORDER if any(n.family == f for n in nodes.values())]
  height = {f: max(len(v) for (ff, _), v in cells.items() if ff == f) for f in families}
  lanes, top = [], 0.0
  for f in families:
    lanes.append((f, top, top - height[f] * _ROW_H))
    top -= height[f] * _ROW_H + _LANE_GAP
  lane_top = {f: t for f, t, _ in lanes}

  xy = {}
  for year in years:
    for f in families:
      members = cells.get((f, year), [])
      depth = _depth_in_cell(members, nodes)
      def key(name):
        ys = [xy[p][1] for p in nodes[name].parents if p in xy]
        return (depth[name], -(sum(ys) / len(ys)) if ys else 0.0, name)
      # Parents in this cell above their children; then, in a lane taller than this cell,
      # the cell's nodes centred on their parents.
      members = sorted(members, key=key)
      slots = height[f]
      parent_ys = [xy[p][1] for m in members for p in nodes[m].parents if p in xy]
      first = 0
      if parent_ys and slots > len(members):
        want = (lane_top[f] - sum(parent_ys) / len(parent_ys)) / _ROW_H - 0.5
        first = int(round(min(max(want - (len(members) - 1) / 2, 0), slots - len(members))))
      for i, m in enumerate(members):
        xy[m] = (col[year] * _COL_W, lane_top[f] - (first + i + 0.5) * _ROW_H)
  return xy, years, lanes


def _depth_in_cell(members, nodes):
  """name -> the length of the longest chain of parents inside `members` above it."""
  depth = {}
  def d(name):
    if name not in depth:
      depth[name] = 1 + max((d(p) for p in nodes[name].parents if p in members), default=-1)
    return depth[name]
  for m in members:
    d(m)
  return depth


def _bend(x0, y0, x1, y1):
  """The arc3 `rad` of an arrow: straight between neighbouring columns of one row; bent
  where a straight line would run through the nodes between, or back over its own column;
  long arrows bend less (arc3's bulge grows with the length)."""
  if x0 == x1:
    return 0.5
  if y0 == y1 and abs(x1 - x0) <= _COL_W:
    return 0.0
  length = ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5
  return min(0.25, 0.8 / length)


def draw(nodes: dict[str, mixer_facts.Node] | None = None):
  """The family tree as a matplotlib Figure (nodes: `mixer_facts.lineage()` by default)."""
  nodes = mixer_facts.lineage() if nodes is None else nodes
  xy, years, lanes = layout(nodes)
  width = 2.0 + 1.55 * len(years)
  height = 1.6 + 0.42 * (lanes[0][1] - lanes[-1][2])
  fig, ax = plt.subplots(figsize=(width, height))

  for i, (family, top, bottom) in enumerate(lanes):
    ax.axhspan(bottom - _LANE_GAP / 2, top + _LANE_GAP / 2, color=FAMILY_COLOURS[family],
               alpha=0.07 if i % 2 else 0.12, lw=0)
    ax.text(-0.55 * _COL_W, (top + bottom) / 2, family, ha="right", va="center",
            fontsize=10, fontweight="bold", color=FAMILY_COLOURS[family])

  for n in nodes.values():
    for p in n.parents:
      (x0, y0), (x1, y1) = xy[p], xy[n.name]
      bend = _bend(x0, y0, x1, y1)
      ax.add_patch(patches.FancyArrowPatch(
          (x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=9, shrinkA=5, shrinkB=6,
          connectionstyle=f"arc3,rad={bend}", lw=0.9, alpha=0.55,
          color=FAMILY_COLOURS[nodes[p].family], zorder=1))

  for n in nodes.values():
    x, y = xy[n.name]
    colour = FAMILY_COLOURS[n.family]
    marker = "s" if n.pattern else "o"
    if n.external:
      ax.scatter([x], [y], s=70, marker=marker, facecolor="white", edgecolor=colour, lw=1.6,
                 zorder=3)
    else:
      ax.scatter([x], [y], s=90, marker=marker, facecolor=colour, edgecolor="black", lw=0.8,
                 zorder=3)
    if n.kernel:
      ax.scatter([x - 0.13 * _COL_W], [y + 0.26 * _ROW_H], s=55, marker="*",
                 color="#f2b400", edgecolor="black", lw=0.4, zorder=4)
    if n.sequence_parallel:
      ax.scatter([x - 0.13 * _COL_W], [y - 0.26 * _ROW_H], s=22, marker="D", color="black",
                 zorder=4)
    ax.text(x + 0.09 * _COL_W, y, n.name, ha="left", va="center", fontsize=8.5,
            style="italic" if n.external else "normal",
            color="#555555" if n.external else "black", zorder=5,
            bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.75))

  ax.set_xticks([i * _COL_W for i in range(len(years))], [str(y) for y in years], fontsize=9)
  ax.set_xlim(-0.6 * _COL_W, (len(years) - 0.15) * _COL_W)
  ax.set_ylim(lanes[-1][2] - _LANE_GAP, lanes[0][1] + _LANE_GAP)
  ax.set_yticks([])
  for side in ("left", "right", "top"):
    ax.spines[side].set_visible(False)
  ax.set_xlabel("year of the paper (one column per year with a node; not to scale)",
                fontsize=9)
  ax.xaxis.grid(True, color="#cccccc", lw=0.5, zorder=0)

  n_reg = sum(not n.external for n in nodes.values())
  n_pat = sum(n.pattern for n in nodes.values())
  n_ker = sum(bool(n.kernel) for n in nodes.values())
  n_sp = sum(n.sequence_parallel for n in nodes.values())
  n_ext = len(nodes) - n_reg
  handles = [
      mlines.Line2D([], [], ls="", marker="o", mfc="#999999", mec="black",
                    label=f"registered mixer, tested ({n_reg - n_pat})"),
      mlines.Line2D([], [], ls="", marker="s", mfc="#999999", mec="black",
                    label=f"layer pattern ({n_pat})"),
      mlines.Line2D([], [], ls="", marker="o", mfc="white", mec="#999999", mew=1.6,
                    label=f"external ancestor, not in seqmix ({n_ext})"),
      mlines.Line2D([], [], ls="", marker="*", ms=10, mfc="#f2b400", mec="black", mew=0.4,
                    label=f"op has a Pallas kernel ({n_ker})"),
      mlines.Line2D([], [], ls="", marker="D", ms=5, mfc="black", mec="black",
                    label=f"sequence-parallel ({n_sp})"),
  ]
  ax.legend(handles=handles, loc="lower left", fontsize=8.5, frameon=True, framealpha=0.9)
  ax.set_title(f"seqmix family tree: {n_reg} registered mixers and patterns, {n_ext} "
               f"external ancestors (arrows: parent -> child, coloured by the parent's family)",
               fontsize=11)
  fig.text(0.995, 0.005, "python -m experiments.tree  (from seqmix.registry)", ha="right",
           va="bottom", fontsize=7, color="#777777")
  fig.tight_layout()
  return fig


def render(out_dir: str) -> tuple[str, str]:
  """Writes family_tree.png and family_tree.svg to out_dir; returns their paths."""
  errors = registry.lineage_errors()
  if errors:
    raise ValueError("the registry's lineage is broken:\n  " + "\n  ".join(errors))
  os.makedirs(out_dir, exist_ok=True)
  fig = draw()
  paths = (os.path.join(out_dir, "family_tree.png"), os.path.join(out_dir, "family_tree.svg"))
  fig.savefig(paths[0], dpi=130)
  with plt.rc_context({"svg.fonttype": "none"}):  # names stay text: searchable, selectable
    fig.savefig(paths[1])
  plt.close(fig)
  return paths


def main(argv):
  del argv
  for path in render(_OUT.value):
    print(path)


if __name__ == "__main__":
  app.run(main)
