"""The ``towerrec`` command line: the parser of every subcommand, and ``main``.

Each subcommand is a module of :mod:`towerrec.launch.commands` with ``add_parser(subparsers)``,
which adds its parser (and any nested subcommands) and sets ``handler``, a function of the parsed
arguments returning the exit code. Heavy imports (torch, torchx, pyarrow) happen inside the
handlers so ``--help`` is fast. A new subcommand is one more module, listed in ``COMMANDS``.

Example::

    from towerrec.launch.cli import main

    main(["data", "synth", "--out", "runs/demo-data", "--rows", "200000"])  # exit code 0
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import Optional, Sequence

from towerrec.launch.commands import data, evaluate, export, importance, init, plan, predict, train
from towerrec.launch.commands.common import Formatter, require_subcommand
from towerrec.trainer.quiet import silence_known_warnings

# The subcommands, in the order `towerrec --help` lists them.
COMMANDS: tuple[ModuleType, ...] = (data, init, train, export, predict, evaluate, importance, plan)


def build_parser() -> argparse.ArgumentParser:
    """The ``towerrec`` parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="towerrec",
        description=(
            "towerrec: distributed multi-task recommendation training on TorchRec.\n\n"
            "quick start:\n"
            "  towerrec data synth --out runs/demo-data --rows 200000\n"
            "  towerrec train --config runs/demo-data/config.yaml --nproc_per_node 2\n\n"
            "multi-node and cluster jobs: launch/components.py:train with `torchx run`\n"
            "(see `torchx run -s local_cwd launch/components.py:train --help`)."
        ),
        formatter_class=Formatter,
    )
    parser.set_defaults(handler=require_subcommand(parser))
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one subcommand; returns its exit code (argparse exits 2 on a usage error)."""
    args = build_parser().parse_args(argv)
    silence_known_warnings()
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
