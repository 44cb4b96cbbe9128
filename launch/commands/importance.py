"""``towerrec importance``: permutation feature importance per task of a saved checkpoint.

Example::

    towerrec importance --run runs/census-ple --data runs/census/valid --out runs/census-ple/imp
"""

from __future__ import annotations

import argparse
import os
import sys

from towerrec.launch.commands.common import (
    EXIT_OK,
    Subparsers,
    add_parser_to,
    add_run_arguments,
    run_errors,
)


def add_parser(subparsers: Subparsers) -> None:
    parser = add_parser_to(
        subparsers,
        "importance",
        help="permutation feature importance per task of a saved checkpoint, and its divergence",
        description=(
            "For every sparse field (or --fields), evaluate checkpoint STEP (default: the best of\n"
            "early stopping, checkpoints/best, when the run has one, else the latest) of run DIR\n"
            "with that field's values permuted among the rows, and report per task the\n"
            "AUC drop against the unpermuted baseline, each task's ranking of the fields, the\n"
            "Spearman correlation of those rankings for every task pair and the fields whose AUC\n"
            "drop differs most. Writes OUT/importance.json, importance.md and importance.png.\n"
            "One process, unsharded, on CPU; `importance.enabled: true` in a config does the same\n"
            "at the end of training with the sharded model.\n\n"
            "example:\n"
            "  towerrec importance --run runs/demo\n"
            "  towerrec importance --run runs/census-ple --data runs/census/valid --out runs/census-ple/imp"
        ),
    )
    add_run_arguments(parser, "importance.batch_size, else training.batch_size")
    parser.add_argument(
        "--data",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="labelled Parquet (None: the run's data.eval)",
    )
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="output directory (None: RUN_DIR/importance)"
    )
    parser.add_argument(
        "--fields", default=None, metavar="F1,F2", help="comma-separated sparse fields (None: all)"
    )
    parser.set_defaults(handler=importance)


def importance(args: argparse.Namespace) -> int:
    """``towerrec importance`` (exit codes: :func:`run_errors`)."""

    def run() -> int:
        from towerrec.trainer.checkpoint import describe_choice
        from towerrec.trainer.importance import importance_from_run, importance_markdown

        fields = [f for f in args.fields.split(",") if f] if args.fields else None
        result, paths = importance_from_run(args.run, args.step, args.data, args.out, args.batch_size, fields)
        checkpoint = result.source["checkpoint"]
        print(describe_choice(checkpoint["path"], checkpoint["chosen"]), file=sys.stderr)
        print(importance_markdown(result))
        for path in paths.values():
            print(f"wrote {os.path.abspath(path)}")
        return EXIT_OK

    return run_errors(run)
