"""moekit: train Mixture-of-Experts language models.

    moekit train                                   # the default recipe: tiny MoE on parlspeech
    moekit train --config configs/tiny-dense.toml --set train.max_steps=200 --out runs/dense
    moekit train --resume runs/moe                 # continue a run exactly where it stopped
    moekit generate runs/moe --prompt "Frau Präsidentin"
    moekit eval runs/moe
    moekit export runs/moe --out models/moe        # model.safetensors + config + tokenizer
    moekit export runs/moe --format hf --out hf/moe   # a Hugging Face directory (Mixtral, ...)
    moekit import hf/moe --out models/imported     # a Hugging Face directory as a moekit model
    moekit upcycle smollm2-135m --experts 8 --top-k 2 --out models/smol-moe   # dense -> MoE (copies)
    moekit train --from models/smol-moe --set data.corpus=news-en   # a new run from those weights
    moekit finetune runs/moe --task rotten-tomatoes --out runs/ft   # supervised fine-tuning, accuracy
    moekit extract runs/mix --task de --out models/de   # only the experts one tag is routed to
    moekit compress runs/moe --method prune --experts 4 --out models/moe-e4   # also merge, quantize, distill
    moekit report runs/moe --baseline runs/dense   # HTML: losses, expert load, routing by language
    moekit search --space space.toml --trials 12 --study sqlite:///runs/s.db --out runs/search   # Optuna
    moekit federate --clients 4 --rounds 5 --strategy local-experts --out runs/fed   # Flower, per language
    moekit data list | moekit data get parlspeech
"""

from __future__ import annotations

import argparse
import os
import select
import sys

from moekit.cli import compress as compress_cmd
from moekit.cli import data as data_cmd
from moekit.cli import evaluate as eval_cmd
from moekit.cli import export as export_cmd
from moekit.cli import extract as extract_cmd
from moekit.cli import federate as federate_cmd
from moekit.cli import finetune as finetune_cmd
from moekit.cli import generate as generate_cmd
from moekit.cli import grow as grow_cmd
from moekit.cli import imports as import_cmd
from moekit.cli import pipeline as pipeline_cmd
from moekit.cli import report as report_cmd
from moekit.cli import search as search_cmd
from moekit.cli import train as train_cmd
from moekit.cli import upcycle as upcycle_cmd


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the usage block first), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES.items())
    parser = _Parser(prog="moekit", description=__doc__, allow_abbrev=False, epilog=f"exit codes:\n{codes}",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train_cmd, finetune_cmd, generate_cmd, eval_cmd, export_cmd, import_cmd, upcycle_cmd,
                   grow_cmd, pipeline_cmd, extract_cmd, compress_cmd, report_cmd, search_cmd, federate_cmd,
                   data_cmd):
        module.register(sub)
    return parser


# one rule for every command (the README's Errors section says it too)
EXIT_CODES = {0: "done",
              1: "the work ran and did not succeed (no search trial completed, a federation without its "
                 "quorum), or a bug in moekit (a traceback: please report it)",
              2: "bad input or environment the user can fix: a flag, a value, a file, a full disk, a "
                 "permission; one line naming what to fix",
              130: "interrupted (Ctrl-C); the last checkpoint is intact",
              141: "stdout closed early (moekit data list | head -1)"}


def main(argv: list[str] | None = None) -> int:
    """Run one command. A closed stdout pipe (``moekit data list | head -1``) ends it quietly
    with exit code 141, what a shell reports for a tool killed by SIGPIPE: the output was cut
    short, so under ``set -o pipefail`` the pipeline says so, as it would for ``cat``."""
    try:
        try:
            return _dispatch(argv)
        finally:
            if sys.stdout is not None:
                sys.stdout.flush()   # a closed pipe surfaces here, not as a second error at exit
    except BrokenPipeError:
        if not _stdout_closed():
            raise                    # some other pipe broke: that is a real error, keep its traceback
        _silence_stdout()
        return 141


def _dispatch(argv: list[str] | None) -> int:
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
    except BrokenPipeError:
        raise                                        # main() decides: a closed stdout, or a real error
    except OSError as err:   # the machine said no (a full disk, a permission): one line, what and where
        where = f" ({err.filename})" if err.filename else ""
        text = err.strerror or str(err)         # lower-case its first letter only: paths keep their case
        print(f"moekit {args.command}: error: {text[:1].lower() + text[1:]}{where}", file=sys.stderr)
        return 2                                # the user can fix it, as a bad value (EXIT_CODES)


def _stdout_closed() -> bool:
    """Whether stdout's reader has gone (poll reports an error on the write end of such a pipe)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):   # no poll (Windows) or no real stdout: trust the error
        return True


def _silence_stdout() -> None:
    """Point stdout at devnull, so the interpreter's flush at exit does not fail a second time
    (the recipe in the Python docs, "Note on SIGPIPE" in the signal module)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
