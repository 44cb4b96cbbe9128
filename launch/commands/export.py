"""``towerrec export``: a trained checkpoint as one self-checked TorchScript artifact.

Example::

    towerrec export --run runs/demo --out runs/demo/model.pt --quantize int8
"""

from __future__ import annotations

import argparse
import os
import sys

from towerrec.launch.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Subparsers,
    add_parser_to,
    probability,
)


def add_parser(subparsers: Subparsers) -> None:
    parser = add_parser_to(
        subparsers,
        "export",
        help="write a trained checkpoint as one TorchScript inference artifact",
        description=(
            "Write checkpoint STEP (default: the best of early stopping, checkpoints/best, when the\n"
            "run has one, else the latest) of run DIR as one TorchScript file:\n"
            "tables through TorchRec's quantize_inference_model, dense towers in eval mode, the\n"
            "feature schema and task names inside. It runs with torch + fbgemm_gpu alone:\n"
            "forward(values, lengths, dense) -> {task: probability}. Before the file replaces\n"
            "FILE it is loaded back and compared with the trained model on evaluation rows;\n"
            "export fails (exit 1, FILE untouched) if a probability moves more than --max_dp\n"
            "or a task's AUC more than --max_dauc.\n\n"
            "example:\n"
            "  towerrec export --run runs/demo --out runs/demo/model.pt\n"
            "  towerrec export --run runs/demo --step 500 --out model-fp16.pt --quantize fp16"
        ),
    )
    parser.add_argument("--run", required=True, metavar="DIR", help="run directory (its checkpoints/)")
    parser.add_argument(
        "--step", type=int, default=None, metavar="N", help="checkpoint step (default: best, else latest)"
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="artifact to write")
    parser.add_argument(
        "--quantize", choices=["int8", "fp16", "none"], default="int8", help="embedding table precision"
    )
    parser.add_argument(
        "--check_data",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="labelled Parquet for the self-check (default: the run's data.eval)",
    )
    parser.add_argument(
        "--check_rows", type=int, default=20_000, metavar="N", help="rows compared; 0 skips the check"
    )
    parser.add_argument(
        "--max_dp",
        type=probability,
        default=None,
        metavar="X",
        help="tolerated max |Δp| (default: per --quantize)",
    )
    parser.add_argument(
        "--max_dauc",
        type=probability,
        default=None,
        metavar="X",
        help="tolerated |ΔAUC| (default: per --quantize)",
    )
    parser.set_defaults(handler=export)


def export(args: argparse.Namespace) -> int:
    """``towerrec export``: 2 for bad arguments, 1 if the check fails or the run cannot be read."""
    if not os.path.isdir(args.run):
        print(f"error: --run {args.run}: no such directory", file=sys.stderr)
        return EXIT_USAGE
    from towerrec.data.parquet import DataError
    from towerrec.trainer.checkpoint import CheckpointError, choose_checkpoint, describe_choice, read_meta
    from towerrec.trainer.export import TOLERANCES, ExportCheckError, Tolerance, export_model

    default = TOLERANCES[args.quantize]
    tolerance = Tolerance(
        default.max_dp if args.max_dp is None else args.max_dp,
        default.max_dauc if args.max_dauc is None else args.max_dauc,
    )
    try:
        step_dir, chosen = choose_checkpoint(args.run, args.step)
        print(describe_choice(step_dir, chosen), file=sys.stderr)
        step = read_meta(step_dir).step  # by step: `latest` and `best` may move meanwhile
        report = export_model(
            args.run, args.out, step, args.quantize, args.check_data, args.check_rows, tolerance
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ExportCheckError as e:
        print(e.report.format())
        print(f"error: export check failed; {args.out} was not written", file=sys.stderr)
        return EXIT_FAILED
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except DataError as e:
        print(f"error: check data: {e}", file=sys.stderr)
        return EXIT_FAILED
    if report is None:
        print("warning: --check_rows 0: the artifact was not checked", file=sys.stderr)
    else:
        print(report.format())
    print(f"wrote {os.path.abspath(args.out)} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    return EXIT_OK
