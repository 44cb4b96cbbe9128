"""Argparse helpers and exit codes shared by the ``towerrec`` subcommands.

Example::

    def add_parser(subparsers: Subparsers) -> None:
        parser = add_parser_to(subparsers, "evaluate", help="...", description="...")
        parser.add_argument("--batch_size", type=positive_int, default=None)
        parser.set_defaults(handler=run)
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

Handler = Callable[[argparse.Namespace], int]
Subparsers = argparse._SubParsersAction  # what ArgumentParser.add_subparsers returns

# exit codes
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples in descriptions as written and shows defaults."""


def add_parser_to(subparsers: Subparsers, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A subcommand parser with the common formatter."""
    return subparsers.add_parser(name, help=help, description=description, formatter_class=Formatter)


def require_subcommand(parser: argparse.ArgumentParser) -> Handler:
    """Handler for a command group run without a subcommand: print its help, usage error."""

    def handler(_: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    return handler


def positive_int(text: str) -> int:
    """Argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not > 0")
    return value


def non_negative_int(text: str) -> int:
    """Argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return value


def probability(text: str) -> float:
    """Argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return value


def add_run_arguments(parser: argparse.ArgumentParser, batch_default: str) -> None:
    """``--run``, ``--step`` and ``--batch_size`` of the commands that read a saved run."""
    parser.add_argument(
        "--run", required=True, metavar="DIR", help="run directory (config.yaml, checkpoints/)"
    )
    parser.add_argument(
        "--step", type=int, default=None, metavar="N", help="checkpoint step (None: best, else latest)"
    )
    parser.add_argument(
        "--batch_size",
        type=positive_int,
        default=None,
        metavar="B",
        help=f"rows per batch (None: {batch_default})",
    )


def run_errors(fn: Callable[[], int]) -> int:
    """Exit codes of the saved-run commands: 2 for bad arguments, 1 for a checkpoint or data error."""
    from towerrec.data.parquet import DataError
    from towerrec.trainer.checkpoint import CheckpointError
    from towerrec.trainer.config import ConfigError

    try:
        return fn()
    except (CheckpointError, DataError) as e:  # DataError is a ValueError: first
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (FileNotFoundError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
