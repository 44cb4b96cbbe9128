"""``towerrec predict``: score Parquet files with an exported artifact, in bounded memory.

Example::

    towerrec predict --model runs/demo/model.pt --data 'runs/demo-data/eval/*.parquet' \\
        --out runs/demo/predictions --nproc 2
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
    positive_int,
)


def add_parser(subparsers: Subparsers) -> None:
    parser = add_parser_to(
        subparsers,
        "predict",
        help="score Parquet files with an exported artifact, writing Parquet",
        description=(
            "Stream Parquet files through an artifact of `towerrec export` in bounded memory and\n"
            "write OUT/part-RANK.parquet: the passthrough columns, then p_<task> (float32) per\n"
            "task, one row per input row in input order. Feature columns are checked and ids\n"
            "hashed or range-checked as in training; label columns are not needed.\n"
            "With --nproc N the rows are split over N processes as training splits them (rank\n"
            "r takes the r-th contiguous share); under torch.distributed.run / TorchX the\n"
            "RANK and WORLD_SIZE variables select the share instead.\n\n"
            "example:\n"
            "  towerrec predict --model runs/demo/model.pt --data 'runs/demo-data/eval/*.parquet' \\\n"
            "      --out runs/demo/predictions --passthrough user_id,item_id --nproc 2"
        ),
    )
    parser.add_argument("--model", required=True, metavar="FILE", help="artifact of `towerrec export`")
    parser.add_argument(
        "--data", required=True, nargs="+", metavar="GLOB", help="Parquet files, directories or globs"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--passthrough",
        default=None,
        metavar="COLS",
        help="comma-separated input columns copied to the output, '' for none "
        "(None: the Parquet columns of the single-hot sparse features)",
    )
    parser.add_argument("--nproc", type=positive_int, default=1, metavar="N", help="processes")
    parser.add_argument("--batch_size", type=positive_int, default=4096, metavar="B", help="rows per batch")
    parser.add_argument(
        "--num_workers",
        type=int,
        choices=[0, 1],
        default=0,
        help="0: read in the predicting process, by a thread ahead of the model (fastest, measured); "
        "1: by a reader process",
    )
    parser.set_defaults(handler=predict)


def predict(args: argparse.Namespace) -> int:
    """``towerrec predict``: 2 for a missing file, 1 for bad data."""
    from towerrec.data.parquet import DataError
    from towerrec.trainer.distributed import describe_error
    from towerrec.trainer.predict import predict, predict_files

    passthrough = None if args.passthrough is None else [c for c in args.passthrough.split(",") if c]
    kw = dict(passthrough=passthrough, batch_size=args.batch_size, num_workers=args.num_workers)
    try:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ and args.nproc == 1:
            from towerrec.data.config import resolve_paths

            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            files = resolve_paths(args.data, "--data")
            results = [predict(args.model, files, args.out, rank, world, **kw)]
        else:
            results = predict_files(args.model, args.data, args.out, args.nproc, **kw)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:  # a reader process's DataError arrives wrapped by the DataLoader
        if "DataError" not in str(e):
            raise
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return EXIT_FAILED
    for path, rows in results:
        print(f"wrote {path} ({rows} rows)")
    return EXIT_OK
