"""``towerrec evaluate``: metrics of a saved checkpoint on labelled Parquet, without training.

Example::

    towerrec evaluate --run runs/census-ple --data runs/census/test --out test.json
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
        "evaluate",
        help="metrics of a saved checkpoint on labelled Parquet files, without training",
        description=(
            "Load checkpoint STEP (default: the best of early stopping, checkpoints/best, when the\n"
            "run has one, else the latest) of run DIR into the unsharded model on CPU (one process,\n"
            "whatever world size trained it) and evaluate it on the --data files as the trainer\n"
            "does: per task auc, ne, logloss, examples, positives. Prints JSON with the step and\n"
            "epoch of the checkpoint (and which was chosen), and writes it to --out. For a final\n"
            "report on test data, pick the step on validation (early stopping's best, or\n"
            "RUN_DIR/metrics.jsonl) and evaluate test once.\n\n"
            "example:\n"
            "  towerrec evaluate --run runs/census-ple --data runs/census/test --out test.json\n"
            "  towerrec evaluate --run runs/demo --step 400 --data 'runs/demo-data/eval/*.parquet'"
        ),
    )
    add_run_arguments(parser, "the run's training.batch_size")
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="GLOB",
        help="labelled Parquet files, directories or globs",
    )
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    parser.set_defaults(handler=evaluate)


def evaluate(args: argparse.Namespace) -> int:
    """``towerrec evaluate`` (exit codes: :func:`run_errors`)."""

    def run() -> int:
        import json

        from towerrec.data.config import resolve_paths
        from towerrec.trainer.checkpoint import describe_choice
        from towerrec.trainer.evaluate import RunEvaluator, evaluation_report

        files = resolve_paths(args.data, "--data")
        evaluator = RunEvaluator(args.run, args.step, args.batch_size)
        print(describe_choice(evaluator.meta.path, evaluator.chosen), file=sys.stderr)
        report = evaluation_report(evaluator, files, evaluator.evaluate(files))
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return EXIT_OK

    return run_errors(run)
