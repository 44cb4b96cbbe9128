"""``towerrec plan``: plan a config for one topology (report + plan.json) or compare several.

Example::

    towerrec plan --config configs/billion_scale.yaml --topology 2x8xA100-80GB --out runs/plan
    towerrec plan --config configs/billion_scale.yaml --topology 2x8xA100-80GB \\
        --topology 8x8xA100-80GB --batch_sizes 2048,8192 --compare --out runs/whatif
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from towerrec.launch.commands.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Subparsers, add_parser_to
from towerrec.trainer.config import add_config_arguments

if TYPE_CHECKING:  # torch and torchrec load only when a plan runs
    from towerrec.trainer.config import ExperimentConfig
    from towerrec.trainer.planning.figures import PlanFigures
    from towerrec.trainer.planning.topology import TopologySpec

EXIT_NO_FIT = EXIT_FAILED


def add_parser(subparsers: Subparsers) -> None:
    parser = add_parser_to(
        subparsers,
        "plan",
        help="plan where every table lives on a cluster, without the cluster",
        description=(
            "Run a shard planner on the model's real embedding tables (built on the meta device,\n"
            "no memory used) for a topology that need not exist, and write OUT/plan.json (the\n"
            "trainer obeys it with --set sharding.plan_file=OUT/plan.json), OUT/report.md,\n"
            "OUT/report.json and charts: memory and estimated time per rank and table, the\n"
            "critical path, whether it fits. Exits 1 if it does not fit.\n\n"
            "TOPOLOGY: a preset NODESxDEVICESxKIND (2x8xA100-80GB, 8x8xH100-80GB, 1x2xCPU-64GB),\n"
            "KEY=VALUE pairs, a preset then overrides, or a YAML/JSON file. Keys: nodes,\n"
            "devices_per_node, device (cuda|cpu), hbm_gb, ddr_gb (per device), hbm_bw, ddr_bw,\n"
            "intra_node_bw, inter_node_bw (GB/s), batch_size (per rank), storage_reserve,\n"
            "sparse_optimizer; the last three default to the config's.\n\n"
            "example:\n"
            "  towerrec plan --config configs/billion_scale.yaml --topology 2x8xA100-80GB \\\n"
            "      --out runs/plan-2x8\n"
            "  towerrec plan --config X.yaml --topology nodes=2,devices_per_node=8,hbm_gb=80,ddr_gb=512 \\\n"
            "      --out runs/plan\n"
            "  towerrec plan --config X.yaml --topology 2x8xA100-80GB --topology 8x8xA100-80GB \\\n"
            "      --batch_sizes 2048,8192 --compare --out runs/whatif"
        ),
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--topology",
        required=True,
        action="append",
        metavar="SPEC",
        help="cluster to plan for (repeatable with --compare)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="plan every topology x batch size; one table and one chart (OUT/compare.md)",
    )
    parser.add_argument(
        "--batch_sizes", metavar="B1,B2", default=None, help="per-rank batch sizes to compare"
    )
    parser.add_argument(
        "--planner",
        choices=["fast", "torchrec"],
        default="fast",
        help="fast: narrowed options + local search; torchrec: TorchRec's default planner (slow at scale)",
    )
    parser.add_argument(
        "--time_budget_s",
        type=float,
        default=20.0,
        metavar="S",
        help="fast planner: time for improving the placement",
    )
    parser.set_defaults(handler=plan)


def plan(args: argparse.Namespace) -> int:
    """``towerrec plan``: 0 if the plan fits, 1 if not, 2 for bad arguments."""
    from towerrec.trainer.config import ConfigError, load_config
    from towerrec.trainer.planning.topology import TopologyError, parse_topologies

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _usage(str(e))
    try:
        specs = [spec for text in args.topology for spec in parse_topologies(text)]
        batch_sizes = _batch_sizes(args.batch_sizes)
    except (TopologyError, ValueError) as e:
        return _usage(str(e))
    variants = [
        spec.model_copy(update={"batch_size": b}) if b else spec
        for spec in specs
        for b in (batch_sizes or [None])
    ]
    if len(variants) > 1 and not args.compare:
        return _usage(
            f"{len(variants)} topologies / batch sizes given; add --compare to compare them, or give one"
        )
    _quiet_planner_logs()
    out = Path(args.out)
    config_name = Path(args.config).stem
    meta = {"config": str(args.config), "overrides": list(args.overrides)}

    if not args.compare:
        figures, code = _plan_one(config, variants[0], out, config_name, args, meta)
        if figures is None:
            return code
        _print_summary(figures, out)
        return code

    all_figures, dirs = [], []
    slugs = _unique_slugs(variants, config.training.batch_size)
    for spec, slug in zip(variants, slugs, strict=True):
        figures, code = _plan_one(config, spec, out / slug, config_name, args, meta)
        if figures is None:
            return code
        all_figures.append(figures)
        dirs.append(slug)
        s = figures.summary
        print(
            f"{s.topology:<24} batch {s.batch_size_per_rank:>7,}: "
            + (
                f"fits, peak memory {s.peak_device_memory_pct:.1f}%, step {s.est_step_time_ms:.2f} ms, "
                f"{s.est_samples_per_s:,} samples/s"
                if s.fits
                else "does not fit"
            ),
            flush=True,
        )
    from towerrec.trainer.planning.render import write_compare

    written = write_compare(all_figures, dirs, out, config_name)
    print(f"compare: {written[0]}  (chart {written[2]}; one report per row under {out}/)")
    return EXIT_OK


def _plan_one(
    config: ExperimentConfig,
    spec: TopologySpec,
    out: Path,
    config_name: str,
    args: argparse.Namespace,
    meta: dict[str, Any],
) -> tuple[PlanFigures | None, int]:
    """Plan one topology and write its report; no figures (and exit 2) for a usage error."""
    from towerrec.trainer.planning.figures import compute_figures
    from towerrec.trainer.planning.planner import (
        PlanningError,
        TableTooLargeError,
        failed_result,
        plan_config,
    )
    from towerrec.trainer.planning.render import write_report

    start = time.perf_counter()
    try:
        result = plan_config(config, spec, planner=args.planner, time_budget_s=args.time_budget_s)
    except TableTooLargeError as e:
        print(f"error: {e}", file=sys.stderr)
        result = failed_result(config, spec, args.planner, str(e), time.perf_counter() - start)
    except PlanningError as e:
        return None, _usage(str(e))
    figures = compute_figures(result, config_name)
    write_report(result, figures, out, meta)
    return figures, EXIT_OK if result.fits else EXIT_NO_FIT


def _print_summary(figures: PlanFigures, out: Path) -> None:
    s = figures.summary
    if s.fits:
        print(
            f"fits: yes on {s.topology} ({s.planner} planner, {s.planning_seconds:.1f} s); "
            f"peak device memory {s.peak_device_memory_pct:.1f}% (rank {s.peak_device_memory_rank}); "
            "estimated "
            f"step {s.est_step_time_ms:.2f} ms, {s.est_samples_per_s:,} samples/s (sparse part); "
            f"slowest rank {s.slowest_rank}"
        )
        print(f"plan:   {out / 'plan.json'}  (train with --set sharding.plan_file={out / 'plan.json'})")
    else:
        print(f"fits: no on {s.topology}: {s.error}", file=sys.stderr)
    print(f"report: {out / 'report.md'}")


def _batch_sizes(text: str | None) -> list[int]:
    if not text:
        return []
    sizes = []
    for token in text.split(","):
        token = token.strip()
        if not token.isdigit() or int(token) <= 0:
            raise ValueError(f"--batch_sizes: {token!r} is not a positive integer (e.g. 1024,4096)")
        sizes.append(int(token))
    return sizes


def _unique_slugs(variants: list[TopologySpec], default_batch: int) -> list[str]:
    slugs = []
    for spec in variants:
        slug = f"{spec.slug}-b{spec.batch_size or default_batch}"
        base, n = slug, 2
        while slug in slugs:
            slug, n = f"{base}-{n}", n + 1
        slugs.append(slug)
    return slugs


def _usage(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _quiet_planner_logs() -> None:
    """A plan is this command's output: TorchRec's own planning logs (proposals, per-table
    notes) would bury it, and nothing in them is actionable here. Errors still show."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("torchrec", "fbgemm_gpu", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
