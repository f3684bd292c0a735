"""moekit: train Mixture-of-Experts language models.

    moekit train                                   # the default recipe: tiny MoE on parlspeech
    moekit train --config configs/tiny-dense.toml --set train.max_steps=200 --out runs/dense
    moekit train --resume runs/moe                 # continue a run exactly where it stopped
    moekit generate runs/moe --prompt "Frau Präsidentin"
    moekit eval runs/moe
    moekit export runs/moe --out models/moe        # model.safetensors + config + tokenizer
    moekit report runs/moe --baseline runs/dense   # HTML: losses, expert load, routing by language
    moekit data list | moekit data get parlspeech
"""

from __future__ import annotations

import argparse
import sys

from moekit.cli import data as data_cmd
from moekit.cli import evaluate as eval_cmd
from moekit.cli import export as export_cmd
from moekit.cli import generate as generate_cmd
from moekit.cli import report as report_cmd
from moekit.cli import train as train_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train_cmd, generate_cmd, eval_cmd, export_cmd, report_cmd, data_cmd):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError) as err:   # bad input: one clear line, no traceback
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted (the last checkpoint is intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
