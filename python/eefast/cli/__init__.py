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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="eefast",
        description="Fast early-exit and adapter tuning of pre-trained LLMs, with fused torch ops.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (info, exits, generate, adapters):
        module.add_commands(sub)
    args = parser.parse_args(argv)
    args.func(args)
