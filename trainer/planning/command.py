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
import warnings
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_NO_FIT, EXIT_USAGE = 0, 1, 2


def run(args: argparse.Namespace) -> int:
    """The handler behind ``towerrec plan`` (arguments: see ``launch.cli``)."""
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
    _quiet()
    out = Path(args.out)
    config_name = Path(args.config).stem
    meta = {"config": str(args.config), "overrides": list(args.overrides)}

    if not args.compare:
        figures, code = _plan_one(config, variants[0], out, config_name, args, meta)
        if code == EXIT_USAGE:
            return code
        _print_summary(figures, out)
        return code

    all_figures, dirs = [], []
    slugs = _unique_slugs(variants, config.training.batch_size)
    for spec, slug in zip(variants, slugs, strict=True):
        figures, code = _plan_one(config, spec, out / slug, config_name, args, meta)
        if code == EXIT_USAGE:
            return code
        all_figures.append(figures)
        dirs.append(slug)
        s = figures["summary"]
        print(
            f"{s['topology']:<24} batch {s['batch_size_per_rank']:>7,}: "
            + (
                f"fits, peak memory {s['peak_device_memory_pct']:.1f}%, step {s['est_step_time_ms']:.2f} ms, "
                f"{s['est_samples_per_s']:,} samples/s"
                if s["fits"]
                else "does not fit"
            ),
            flush=True,
        )
    from towerrec.trainer.planning.report import write_compare

    written = write_compare(all_figures, dirs, out, config_name)
    print(f"compare: {written[0]}  (chart {written[2]}; one report per row under {out}/)")
    return EXIT_OK


def _plan_one(
    config: Any, spec: Any, out: Path, config_name: str, args: argparse.Namespace, meta: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    from towerrec.trainer.planning.planner import (
        PlanningError,
        TableTooLargeError,
        failed_result,
        plan_config,
    )
    from towerrec.trainer.planning.report import compute_figures, write_report

    start = time.perf_counter()
    try:
        result = plan_config(config, spec, planner=args.planner, time_budget_s=args.time_budget_s)
    except TableTooLargeError as e:
        print(f"error: {e}", file=sys.stderr)
        result = failed_result(config, spec, args.planner, str(e), time.perf_counter() - start)
    except PlanningError as e:
        _usage(str(e))
        return {}, EXIT_USAGE
    figures = compute_figures(result, config_name)
    write_report(result, figures, out, meta)
    return figures, EXIT_OK if result.fits else EXIT_NO_FIT


def _print_summary(figures: dict[str, Any], out: Path) -> None:
    s = figures["summary"]
    if s["fits"]:
        print(
            f"fits: yes on {s['topology']} ({s['planner']} planner, {s['planning_seconds']:.1f} s); "
            f"peak device memory {s['peak_device_memory_pct']:.1f}% (rank {s['peak_device_memory_rank']}); "
            "estimated "
            f"step {s['est_step_time_ms']:.2f} ms, {s['est_samples_per_s']:,} samples/s (sparse part); "
            f"slowest rank {s['slowest_rank']}"
        )
        print(f"plan:   {out / 'plan.json'}  (train with --set sharding.plan_file={out / 'plan.json'})")
    else:
        print(f"fits: no on {s['topology']}: {s['error']}", file=sys.stderr)
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


def _unique_slugs(variants: list[Any], default_batch: int) -> list[str]:
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


def _quiet() -> None:
    """TorchRec logs and warns a lot while planning; a user can act on none of it here."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("torchrec", "fbgemm_gpu", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torchrec")
    warnings.filterwarnings("ignore", message=".*an autograd kernel was not registered.*")
    # TorchRec's plan validation notes every data-parallel table on the root logger
    logging.getLogger().addFilter(lambda record: not str(record.msg).startswith("Sharding spec not found"))
