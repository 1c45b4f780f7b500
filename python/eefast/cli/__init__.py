"""The `eefast` command line. Each command module adds its subcommands and calls library
functions; none holds domain logic or imports another command module.

  exits.py     demo (the main job), tune, eval-exits, train-classifier, draft-vocab, distill-data
  generate.py  generate, calibrate, bench-generate
  adapters.py  finetune, eval
  info.py      info, demo-ops
"""

from __future__ import annotations

import argparse

from . import adapters, exits, generate, info

# What a user's input can cause (a bad value, a missing or malformed file): one line on
# stderr and exit status 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (the usage is under --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(
        prog="eefast",
        description="Fast early-exit and adapter tuning of pre-trained LLMs, with fused torch ops.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of a user error"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (info, exits, generate, adapters):
        module.add_commands(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        parser.exit(2, f"eefast {args.command}: error: {_one_line(e)}\n")


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())
