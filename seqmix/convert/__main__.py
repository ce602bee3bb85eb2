"""python -m seqmix.convert --from hf --path HF_DIR --to SEQMIX_DIR
   python -m seqmix.convert --from seqmix --path SEQMIX_DIR --to HF_DIR [--family llama]

Reads local files only (download a hub checkpoint with your hub client first).
"""

import argparse
import sys

from seqmix import convert


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m seqmix.convert", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--from", dest="src", choices=("hf", "seqmix"), required=True,
                  help="format of --path: a Hugging Face checkpoint dir or a seqmix one")
  ap.add_argument("--path", required=True, help="input directory")
  ap.add_argument("--to", required=True, help="output directory")
  ap.add_argument("--family", default=None, choices=sorted(convert.FAMILIES),
                  help="HF family to export to (--from seqmix; default: from the config)")
  ap.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = ap.parse_args(argv)
  progress = not args.no_progress
  if args.src == "hf":
    cfg, params = convert.from_hf(args.path, progress=progress)
    convert.save_seqmix(cfg, params, args.to)
    print(f"wrote seqmix checkpoint ({cfg.mixer}, {cfg.n_layers} layers) to {args.to}")
  else:
    cfg, params = convert.load_seqmix(args.path, progress=progress)
    family = args.family or convert.family_of(cfg)
    convert.to_hf(cfg, params, args.to, family=family, progress=progress)
    print(f"wrote Hugging Face {family} checkpoint to {args.to}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
