"""What a plan means, for people (report.md, charts) and machines (report.json, plan.json).

Renders :class:`~towerrec.trainer.planning.figures.PlanFigures` (computed in
:mod:`~towerrec.trainer.planning.figures`): the files of one ``towerrec plan`` run, and the
comparison of several topologies or batch sizes (``--compare``).

Example::

    figures = compute_figures(result, config_name="billion_scale")
    write_report(result, figures, Path("docs/plans/billion-2x8"))   # plan.json, report.md/json, charts
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from towerrec.trainer.planning.figures import MB, PERF_FIELDS, SCOPE, CompareRow, PlanFigures
from towerrec.trainer.planning.plan_file import write_plan_file
from towerrec.trainer.planning.planner import PlanResult
from towerrec.trainer.planning.topology import GB


def write_report(
    result: PlanResult, figures: PlanFigures, out: Path, plan_meta: dict[str, Any] | None = None
) -> list[Path]:
    """plan.json (when it fits), report.json, report.md, memory.png, time.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    plan_path = out / "plan.json"
    if result.fits and result.sharding_plan is not None:
        write_plan_file(plan_path, result.sharding_plan, result.spec, result.planner, plan_meta or {})
        written.append(plan_path)
    else:  # files of an earlier run must not be mistaken for this one's
        for stale in (plan_path, out / "memory.png", out / "time.png"):
            stale.unlink(missing_ok=True)
    (out / "report.json").write_text(json.dumps(figures.to_json(), indent=1) + "\n")
    written.append(out / "report.json")
    charts = []
    if figures.placed:
        charts = [memory_chart(figures, out / "memory.png"), time_chart(figures, out / "time.png")]
        written += charts
    (out / "report.md").write_text(markdown(figures, [c.name for c in charts]))
    written.append(out / "report.md")
    return written


def _gb(n: float) -> str:
    return f"{n / GB:,.1f}"


def _size(n: float) -> str:
    if not n:
        return "-"
    for unit, scale in (("GB", GB), ("MB", MB), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def _ranks_text(ranks: list[int], devices_per_node: int, world_size: int) -> str:
    if len(ranks) == world_size and world_size > 1:
        return f"all {world_size}"
    runs, start, prev = [], None, None
    for r in ranks:
        if start is None:
            start = prev = r
        elif r == prev + 1:
            prev = r
        else:
            runs.append((start, prev))
            start = prev = r
    if start is not None:
        runs.append((start, prev))
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
    if (
        len(ranks) == devices_per_node
        and ranks[0] % devices_per_node == 0
        and ranks == list(range(ranks[0], ranks[0] + devices_per_node))
    ):
        text += f" (node {ranks[0] // devices_per_node})"
    return text


def markdown(figures: PlanFigures, charts: list[str]) -> str:
    """report.md: summary, charts, critical path, imbalance, ranks, tables."""
    s = figures.summary
    spec = figures.topology
    lines = [f"# Shard plan: {s.config} on {s.topology}", ""]
    lines += ["## Summary", ""]
    if not s.fits:
        lines += [f"- **Fits: no.** {s.error}"]
    else:
        device = "HBM" if s.compute_device == "cuda" else "host memory"
        lines += [
            f"- **Fits: yes.** Peak device memory {s.peak_device_memory_pct:.1f}% of {device} "
            f"(rank {s.peak_device_memory_rank})"
            + (
                (
                    f", peak host memory {s.peak_host_memory_pct:.1f}% "
                    f"(rank {s.peak_host_memory_rank}) for tables cached from host memory"
                    if s.peak_host_memory_pct
                    else "; no table in host memory"
                )
                if s.compute_device == "cuda"
                else ""
            )
            + ".",
            f"- **Estimated step time: {s.est_step_time_ms:.2f} ms** (critical path), about "
            f"**{s.est_samples_per_s:,} samples/s** at {s.batch_size_per_rank:,} per rank x "
            f"{s.world_size} ranks.",
            f"- **Slowest rank: {s.slowest_rank}** with {s.slowest_rank_ms:.2f} ms of estimated work.",
            f"- Tables: {s.tables}; sharding: "
            + ", ".join(f"{k} {v}" for k, v in s.sharding_types_used.items())
            + "; kernels: "
            + ", ".join(f"{k} {v}" for k, v in s.compute_kernels_used.items())
            + ".",
        ]
    lines += [
        f"- Topology: {spec.describe()}; batch {s.batch_size_per_rank:,} per rank; storage reserve "
        f"{s.storage_reserve:.0%}; sparse optimizer {s.sparse_optimizer} (its state counts in memory).",
        f"- Planner: {s.planner}, {s.planning_seconds:.1f} s.",
        f"- Scope: {s.scope}",
    ]
    if s.note:
        lines += [f"- {s.note}"]
    lines += [""]
    if not s.fits:
        return "\n".join(lines)

    if charts:
        lines += ["## Charts", ""] + [f"![{c.split('.')[0]}]({c})" for c in charts] + [""]

    cp = figures.critical_path
    lines += [
        "## Critical path",
        "",
        f"Ranks synchronise after each phase, so a phase lasts as long as its slowest rank: "
        f"{cp.comms_ms:.3f} ms of communication + {cp.compute_ms:.3f} ms of compute = "
        f"**{cp.total_ms:.3f} ms**.",
        "",
    ]
    lines += _table(
        ["phase", "slowest rank", "ms"],
        [[p.phase, p.slowest_rank, f"{p.ms:.3f}"] for p in cp.phases],
    )
    lines += ["", "## Imbalance", "", "0 = perfectly balanced, 1 = everything on one rank.", ""]
    imb = figures.imbalance
    metrics = sorted({m for v in imb.values() for m in v}, key=lambda m: (m != "max_over_mean", m))
    lines += _table(
        ["measure"] + [d.replace("_", " ") for d in imb],
        [[m.replace("_", " ")] + [f"{imb[d].get(m, 0):.3f}" for d in imb] for m in metrics],
    )
    lines += ["", "## Ranks", ""]
    cuda = s.compute_device == "cuda"
    header = ["rank", "node"]
    header += ["HBM used GB", "HBM %"] if cuda else []
    header += ["host GB", "host %", "fwd comp ms", "bwd comp ms", "fwd comm ms", "bwd comm ms", "total ms"]
    header += ["input MB", "output MB", "shards"]
    rows = []
    for r in figures.ranks:
        row = [r.rank, r.node]
        if cuda:
            row += [_gb(r.hbm_used), f"{r.hbm_used_pct:.1f}"]
        row += [_gb(r.ddr_used), f"{r.ddr_used_pct:.1f}"]
        row += [f"{r.phase_ms(f):.3f}" for f in ("fwd_compute", "bwd_compute", "fwd_comms", "bwd_comms")]
        row += [f"{r.total_ms:.3f}", f"{r.input_mb:.2f}", f"{r.output_mb:.2f}", r.shards]
        rows.append(row)
    lines += _table(header, rows)
    lines += [
        "",
        "Memory used = embedding shards (weights, optimizer state, input/output buffers) + TorchRec's "
        "reservation for dense parameters and input batches; the storage reserve is kept free on top.",
        "",
        "## Tables",
        "",
    ]
    rows = []
    for t in sorted(figures.tables, key=lambda t: -t.bytes_with_optimizer):
        rows.append(
            [
                t.table,
                f"{t.rows:,}",
                t.dim,
                t.features,
                f"{t.pooling_factor:g}",
                t.sharding_type,
                t.compute_kernel,
                _ranks_text(t.ranks, spec.devices_per_node, spec.world_size),
                _size(t.bytes_with_optimizer),
            ]
            + ([_size(t.hbm_bytes)] if cuda else [])
            + [_size(t.ddr_bytes), f"{t.time_ms:.3f}"]
        )
    lines += _table(
        [
            "table",
            "rows",
            "dim",
            "features",
            "pooling",
            "sharding",
            "kernel",
            "ranks",
            "size with optimizer",
        ]
        + (["HBM (all shards)"] if cuda else [])
        + ["host memory (all shards)", "time ms (all shards)"],
        rows,
    )
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


# ------------------------------------------------------------------------------------- charts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def memory_chart(figures: PlanFigures, path: Path) -> Path:
    """Per rank, stacked: embedding shards, dense+inputs reservation, free; capacity line."""
    plt = _pyplot()
    ranks = figures.ranks
    cuda = figures.summary.compute_device == "cuda"
    tiers = [("hbm", "device memory (HBM)")] if cuda else [("ddr", "host memory")]
    if cuda and any(r.ddr_embeddings for r in ranks):  # tables cached from host memory
        tiers.append(("ddr", "host memory (tables behind an HBM cache)"))
    x = [r.rank for r in ranks]
    width = max(6.0, min(18.0, 0.22 * len(x) + 3))
    fig, axes = plt.subplots(len(tiers), 1, figsize=(width, 3.2 * len(tiers)), squeeze=False)
    for ax, (tier, title) in zip(axes[:, 0], tiers, strict=True):
        emb = [getattr(r, f"{tier}_embeddings") / GB for r in ranks]
        reserved = [getattr(r, f"{tier}_dense_and_inputs") / GB for r in ranks]
        margin = [
            max(
                getattr(r, f"{tier}_capacity")
                - getattr(r, f"{tier}_available")
                - getattr(r, f"{tier}_dense_and_inputs"),
                0,
            )
            / GB
            for r in ranks
        ]
        cap = getattr(ranks[0], f"{tier}_capacity") / GB
        ax.bar(x, emb, color="#4C72B0", label="embedding shards")
        ax.bar(x, reserved, bottom=emb, color="#DD8452", label="dense + input reservation")
        bottoms = [a + b for a, b in zip(emb, reserved, strict=True)]
        if any(margin):
            ax.bar(x, margin, bottom=bottoms, color="#CCCCCC", label="storage reserve (kept free)")
        ax.axhline(cap, color="#C44E52", linestyle="--", linewidth=1.2, label=f"capacity {cap:g} GB")
        ax.set_ylabel("GB")
        ax.set_title(f"{title} per rank", fontsize=9)
        ax.set_xlim(-0.6, len(x) - 0.4)
        ax.set_ylim(0, cap * 1.32)
        ax.legend(loc="upper center", fontsize=7, ncol=4, frameon=False)
    axes[-1, 0].set_xlabel("rank")
    fig.suptitle(f"{figures.summary.config} on {figures.summary.topology}: memory", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def time_chart(figures: PlanFigures, path: Path) -> Path:
    """Per rank, stacked estimated time by phase; the step time (critical path) as a line."""
    plt = _pyplot()
    ranks = figures.ranks
    x = [r.rank for r in ranks]
    width = max(6.0, min(18.0, 0.22 * len(x) + 3))
    fig, ax = plt.subplots(figsize=(width, 3.4))
    bottom = [0.0] * len(x)
    colors = ["#4C72B0", "#55A868", "#DD8452", "#C44E52", "#8172B3", "#937860"]
    for field, color in zip(PERF_FIELDS, colors, strict=True):
        values = [r.phase_ms(field) for r in ranks]
        # input_dist_comms is not part of TorchRec's per-shard total; prefetch only with caching
        if field == "input_dist_comms" or (field == "prefetch_compute" and not any(values)):
            continue
        ax.bar(x, values, bottom=bottom, color=color, label=field.replace("_", " "))
        bottom = [a + b for a, b in zip(bottom, values, strict=True)]
    step = figures.summary.est_step_time_ms
    ax.axhline(
        step, color="black", linestyle="--", linewidth=1.0, label=f"step (critical path) {step:.2f} ms"
    )
    ax.set_xlabel("rank")
    ax.set_ylabel("ms")
    ax.set_xlim(-0.6, len(x) - 0.4)
    ax.set_ylim(0, max(max(bottom), step) * 1.35)
    ax.set_title(
        f"{figures.summary.config} on {figures.summary.topology}: estimated time per rank",
        fontsize=10,
    )
    ax.legend(loc="upper center", fontsize=7, ncol=5, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ compare


def write_compare(all_figures: list[PlanFigures], dirs: list[str], out: Path, config_name: str) -> list[Path]:
    """compare.md, compare.json and compare.png: one row per topology / batch size."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [CompareRow.of(f) for f in all_figures]
    (out / "compare.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    chart = compare_chart(rows, out / "compare.png", config_name)
    lines = [f"# What-if: {config_name}", "", SCOPE, "", f"![compare]({chart.name})", ""]
    table = []
    for row, d in zip(rows, dirs, strict=True):
        fits = "yes" if row.fits else "**no**"
        table.append(
            [
                f"[{row.topology}]({d}/report.md)",
                row.world_size,
                f"{row.batch_size_per_rank:,}",
                fits,
                f"{row.peak_device_memory_pct:.1f}" if row.peak_device_memory_pct is not None else "-",
                f"{row.est_step_time_ms:.2f}" if row.est_step_time_ms is not None else "-",
                f"{row.est_samples_per_s:,}" if row.est_samples_per_s is not None else "-",
            ]
        )
    lines += _table(
        ["topology", "ranks", "batch per rank", "fits", "peak memory %", "est. step ms", "est. samples/s"],
        table,
    )
    notes = [f"- {r.topology}: {r.error}" for r in rows if not r.fits and r.error]
    if notes:
        lines += ["", "Does not fit:", ""] + notes
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    return [out / "compare.md", out / "compare.json", chart]


def compare_chart(rows: list[CompareRow], path: Path, config_name: str) -> Path:
    """Step time and samples/s per row; rows that do not fit greyed."""
    plt = _pyplot()
    labels = [f"{r.topology}\nbatch {r.batch_size_per_rank}" for r in rows]
    x = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows) + 2), 3.6))
    step = [r.est_step_time_ms or 0 for r in rows]
    sps = [(r.est_samples_per_s or 0) / 1e6 for r in rows]
    colors = ["#4C72B0" if r.fits else "#BBBBBB" for r in rows]
    ax1.bar(x, step, color=colors)
    ax2.bar(x, sps, color=colors)
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
    for i, r in enumerate(rows):
        if not r.fits:
            ax1.text(i, 0, "does not fit", ha="center", va="bottom", rotation=90, fontsize=8)
        elif r.peak_device_memory_pct is not None:
            ax1.text(i, step[i], f"{r.peak_device_memory_pct:.0f}% mem", ha="center", va="bottom", fontsize=7)
    ax1.set_ylabel("estimated step time, ms")
    ax2.set_ylabel("estimated samples/s, millions")
    fig.suptitle(f"{config_name}: what-if (sparse part of the step, TorchRec estimates)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
