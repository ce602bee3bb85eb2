"""Every row of the reading-list catalog with its true status, as README tables.

    python -m experiments.catalog --write README.md     # regenerate the README block
    python -m experiments.catalog --check README.md     # exit 1 if the block is stale
    python -m experiments.catalog --import ../shared/CATALOG.md   # refresh catalog_rows.tsv

The rows (number, name, section, priority, kind) are `catalog_rows.tsv`, imported from the
catalog's build table. A row's status comes from `BUILT` below: the seqmix names that
implement it, each checked against the library when the table is made (a registered mixer,
a positional component, a model/mixer option), so the table cannot claim a name that does not
exist. A row without an entry is "not built". The README block sits between
`<!-- catalog:start -->` and `<!-- catalog:end -->`; tests/experiments/test_catalog.py checks
it is current.
"""

import argparse
import dataclasses
import os
import re
import sys

from seqmix import registry

_ROWS_FILE = os.path.join(os.path.dirname(__file__), "catalog_rows.tsv")
START, END = "<!-- catalog:start -->", "<!-- catalog:end -->"


@dataclasses.dataclass(frozen=True)
class Row:
  number: int
  name: str
  section: str
  priority: str
  kind: str


def rows() -> list[Row]:
  out = []
  with open(_ROWS_FILE) as f:
    for line in f:
      if line.startswith("#") or not line.strip():
        continue
      n, name, section, prio, kind = line.rstrip("\n").split("\t")
      out.append(Row(int(n), name, section, prio, kind))
  return out


def _mixer(name):
  return ("mixer", name)


def _option(mixer, field, note):
  """A field of a registered mixer (checked to exist) with the value that selects the row."""
  return ("option", mixer, field, note)


def _system(path, note):
  """A module or file of the repository (checked to exist) that implements a systems row."""
  return ("system", path, note)


# Row number -> what implements it. Extend this when a row is built; the generator refuses a
# name that does not exist.
BUILT: dict[int, tuple] = {
    1: (_mixer("mha"),),
    2: (_option("mha", "num_kv_heads", "num_kv_heads=1"),),
    3: (_option("mha", "num_kv_heads", "num_kv_heads=G"),),
    4: (_option("mha", "window", "window=W"), _mixer("local_mqa")),
    5: (_mixer("dcmha"),),
    9: (_mixer("sparse_transformer"),),
    10: (_mixer("longformer"),),
    11: (_mixer("bigbird"),),
    23: (_mixer("longnet"),),
    30: (_mixer("cosine_attention"),),
    42: (_mixer("retnet"),),
    43: (_mixer("gla"),),
    44: (_mixer("rwkv6"),),
    45: (_mixer("deltanet"),),
    46: (_mixer("gated_deltanet"),),
    47: (_mixer("based"),),
    48: (_mixer("rebased"),),
    49: (_mixer("hedgehog"),),
    51: (_mixer("lightning"),),
    56: (_mixer("cosformer"),),
    58: (_mixer("transnormer"),),
    59: (_mixer("performer"),),
    61: (_mixer("linear_transformer"),),
    69: (_mixer("mamba"),),
    70: (_mixer("mamba2"),),
    71: (_mixer("s4"),),
    72: (_mixer("s4d"),),
    76: (_mixer("dss"),),
    77: (_mixer("gss"),),
    78: (_mixer("h3"),),
    79: (_mixer("s5"),),
    82: (_mixer("hawk"), _mixer("griffin")),
    83: (_mixer("hgrn2"),),
    84: (_mixer("lru"),),
    85: (_mixer("mlstm"), _mixer("slstm"), _mixer("xlstm")),
    86: (_mixer("hgrn"),),
    87: (_mixer("rwkv4"),),
    88: (_mixer("gateloop"),),
    92: (_mixer("ttt_linear"), _mixer("ttt_mlp")),
    106: (_mixer("mega"),),
    94: (_mixer("hyena"),),
    95: (_mixer("m2"),),
    96: (_mixer("tnn"),),
    97: (_mixer("multiresconv"),),
    98: (_mixer("lightconv"), _mixer("dynamicconv")),
    99: (_mixer("talk"),),
    100: (_mixer("token_shift_gpt"),),
    101: (_mixer("synthesizer_dense"), _mixer("synthesizer_random")),
    102: (_mixer("aft"), _mixer("aft_simple"), _mixer("aft_local")),
    103: (_mixer("gmlp"),),
    104: (_mixer("metaformer"),),
    105: (_mixer("samba"), _mixer("samba_swa")),
    112: (_mixer("jamba"), _mixer("jamba_attention")),
    113: (_mixer("zamba"), _mixer("zamba_attention")),
    114: (_mixer("mamba2_hybrid"),),
    116: (_mixer("infini_attention"),),
    117: (_mixer("transformer_xl"),),
    119: (_system("seqmix/models/rmt.py", "RMT over seqmix.models.segment_recurrent"),),
    124: (_mixer("memorizing"),),
    125: (_mixer("landmark"),),
    145: (_option("mha", "position", 'position="rope"'),),
    146: (_option("mha", "position", 'position="alibi"'),),
    147: (_option("mha", "position", 'position="fire"'),),
    148: (_option("mha", "position", 'position="cope"'),),
    149: (_option("mha", "position", 'position="xpos"'),),
    150: (_option("mha", "position", 'position="bipe"'),),
    151: (_option("mha", "position", 'position="resonance"'),),
    152: (_option("mha", "position", 'position="kerple_log" / "kerple_power"'),),
    153: (_option("mha", "position", 'position="sandwich"'),),
    156: (_option("mha", "position", 'position="nope"'),),
    157: (_option("mha", "position", 'position="nope_temperature"'),),
    158: (_option("mha", "position", 'position="cape"'),),
    160: (_option("mha", "position", 'position="coca"'),),
    161: (_option("mha", "rope_scaling", 'rope_scaling={"rope_type": "linear", ...}'),),
    162: (_option("mha", "rope_scaling", 'rope_scaling={"rope_type": "ntk", ...}'),),
    163: (_option("mha", "rope_scaling", 'rope_scaling={"rope_type": "dynamic", ...}'),),
    164: (_option("mha", "rope_scaling", 'rope_scaling={"rope_type": "yarn", ...}'),),
    165: (_option("mha", "rope_scaling", 'rope_scaling={"rope_type": "longrope", ...}'),),
    168: (_system("seqmix/positional/rope_scaling.py", "base_for_context / critical_dimension"),),
    169: (_system("seqmix/positional/rope_scaling.py", "entropy_aware_logit_scale"),),
    170: (_option("mha", "rope_scaling", 'rope_scaling={"rope_type": "abf", ...}'),),
    171: (_option("mha", "rope_scaling", 'rope_scaling={"rope_type": "giraffe_power" / "giraffe_truncated", ...}'),),
    172: (_system("seqmix/data/pose.py", "PoSE training positions"),),
    173: (_mixer("self_extend"),),
    174: (_mixer("dca"),),
    175: (_mixer("lm_infinite"),),
    176: (_mixer("streaming_llm"),),
    177: (_mixer("tova"),),
    185: (_system("seqmix/mixers/common/peer.py", 'LanguageModel(mlp="peer")'),),
    187: (_system("seqmix/mixers/common/pkm.py", 'LanguageModel(mlp="pkm")'),),
    191: (_system("seqmix/parallel", "ring / all-gather context parallelism (issue 16)"),),
    193: (_system("seqmix/parallel", "state-passing sequence parallelism of gla / delta_rule"),),
    194: (_system("kernels_pallas/attention", "Pallas flash attention with lse"),),
    202: (_system("seqmix/data/mqar.py", "MQAR task + experiments/sweep.py"),),
}


def _check(ref) -> str:
  """The table text of one reference; raises if it names nothing that exists."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if ref[0] == "mixer":
    registry.get(ref[1])  # KeyError naming the valid ones
    return f"`{ref[1]}`"
  if ref[0] == "option":
    _, mixer, field, note = ref
    fields = {f.name for f in dataclasses.fields(registry.get(mixer).cls)}
    if field not in fields:
      raise KeyError(f"catalog: mixer {mixer!r} has no field {field!r} (fields: {sorted(fields)})")
    return f"`{mixer}({note})`"
  if ref[0] == "system":
    _, path, note = ref
    if not os.path.exists(os.path.join(root, path)):
      raise FileNotFoundError(f"catalog: {path} does not exist")
    return f"{note} (`{path}`)"
  raise ValueError(f"catalog: unknown reference kind {ref!r}")


def table() -> str:
  """The README block: one table per catalog section, every row with its status."""
  out, section = [], None
  all_rows = rows()
  counts = {}
  for r in all_rows:
    c = counts.setdefault(r.section, [0, 0])
    c[0] += 1
    c[1] += r.number in BUILT
  built = sum(c[1] for c in counts.values())
  out.append(f"{built} of {len(all_rows)} catalog rows built. A row is built when a registered "
             "mixer, option or module implements it (the names link the row to the code; "
             "`python -m experiments.catalog --check` verifies them).")
  for r in all_rows:
    if r.section != section:
      section = r.section
      done, total = counts[section][1], counts[section][0]
      out += ["", f"<details><summary>{section}: {done} of {total} built</summary>", "",
              "| # | name | P | status |", "|---|---|---|---|"]
    status = ("built: " + ", ".join(_check(x) for x in BUILT[r.number])
              if r.number in BUILT else "not built")
    out.append(f"| {r.number} | {r.name} | {r.priority} | {status} |")
    nxt = all_rows.index(r) + 1
    if nxt == len(all_rows) or all_rows[nxt].section != section:
      out += ["", "</details>"]
  return "\n".join(out) + "\n"


def replace_block(text: str, block: str) -> str:
  if START not in text or END not in text:
    raise ValueError(f"README has no {START} ... {END} block: add the two markers where the "
                     "catalog table goes.")
  head, rest = text.split(START, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{START}\n{block}{END}{tail}"


def import_rows(catalog_md: str):
  """catalog_rows.tsv from the build table of CATALOG.md (section 6)."""
  lines, section = [], None
  with open(catalog_md) as f:
    for line in f:
      m = re.match(r"### (.+?) \((\d+)\)", line)
      if m:
        section = re.sub(r" \(.*", "", m.group(1))
        continue
      if section and re.match(r"\| \d+ \|", line):
        c = [x.strip() for x in line.strip().strip("|").split("|")]
        lines.append("\t".join([c[0], c[1].replace("**", ""), section, c[9], c[3]]))
  with open(_ROWS_FILE, "w") as f:
    f.write("# CATALOG.md section 6 rows (number, name, section, priority, kind), imported by "
            "experiments.catalog --import\n" + "\n".join(lines) + "\n")
  print(f"{len(lines)} rows -> {_ROWS_FILE}")


def main(argv=None):
  ap = argparse.ArgumentParser()
  g = ap.add_mutually_exclusive_group(required=True)
  g.add_argument("--write", metavar="README")
  g.add_argument("--check", metavar="README")
  g.add_argument("--import", dest="import_md", metavar="CATALOG_MD")
  g.add_argument("--print", action="store_true")
  a = ap.parse_args(argv)
  if a.import_md:
    import_rows(a.import_md)
    return 0
  block = table()
  if a.print:
    print(block)
    return 0
  path = a.write or a.check
  with open(path) as f:
    text = f.read()
  new = replace_block(text, block)
  if a.write:
    with open(path, "w") as f:
      f.write(new)
    return 0
  if new != text:
    print(f"{path}: the catalog table is stale; run python -m experiments.catalog --write {path}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
