"""Permutation feature importance per task, and how much the tasks disagree about it.

Example::

    result = permutation_importance(lambda field: evaluator.evaluate(files, field), fields)
    result.drop["user_id"]["click"]        # baseline AUC - AUC with user_id's bags permuted
    write_importance(result, "runs/demo/importance")   # importance.{json,md,png}

    importance_from_run("runs/demo")       # the same from a saved run, on its data.eval

Importance of a sparse field for a task: the drop in the task's AUC when the field's bags are
permuted among the rows of each read slice (``ParquetDataset(permute_feature=...)``), which
breaks the field's link to the labels and keeps its distribution. Fields are ranked per task
(1 = largest drop, ties get their average rank); the divergence between two tasks is the
Spearman rank correlation of their drop vectors (1: same order, -1: reversed), and the fields
whose ranks differ most are listed: the DTN paper's observation that one feature can matter a lot
to one task and little to another.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torchmetrics.functional import spearman_corrcoef

logger = logging.getLogger(__name__)

Metrics = dict[str, dict[str, float]]
Evaluate = Callable[[str | None], Metrics]
"""``evaluate(permute_feature) -> {task: metrics}``; None: nothing permuted (the baseline)."""

_DIVERGENT_SHOWN = 5


def average_ranks(values: Sequence[float], descending: bool = True) -> list[float]:
    """1-based ranks; tied values share their average rank; NaN ranks last.

    Example::

        average_ranks([0.3, 0.1, 0.3])   # [1.5, 3.0, 1.5]
    """
    key = [(-v if descending else v) if not math.isnan(v) else math.inf for v in values]
    order = sorted(range(len(values)), key=lambda i: key[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and key[order[end + 1]] == key[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (``torchmetrics``: Pearson's on average ranks, exact with ties).
    NaN when either vector is constant, has fewer than 2 values or holds a NaN.

    Example::

        spearman([1, 2, 3], [10, 20, 30])   # 1.0
        spearman([1, 2, 3], [3, 2, 1])      # -1.0
    """
    if len(x) != len(y):
        raise ValueError(f"spearman: vectors of lengths {len(x)} and {len(y)}")
    # torchmetrics adds 1e-6 to the denominator (a relative error below 1e-5 for any vector of
    # two or more distinct values) and so answers 0 where the correlation is undefined: NaN here.
    if len(x) < 2 or any(math.isnan(v) for v in [*x, *y]) or len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    rho = spearman_corrcoef(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64))
    return float(rho)


@dataclass
class ImportanceResult:
    """AUC per task with nothing permuted and with each field permuted; drops, ranks, divergence."""

    fields: list[str]
    tasks: list[str]
    baseline: Metrics
    permuted: dict[str, Metrics]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def drop(self) -> dict[str, dict[str, float]]:
        """``{field: {task: baseline AUC - permuted AUC}}``."""
        return {
            f: {t: self.baseline[t]["auc"] - self.permuted[f][t]["auc"] for t in self.tasks}
            for f in self.fields
        }

    @property
    def ranks(self) -> dict[str, dict[str, float]]:
        """``{field: {task: rank}}``, 1 = the field whose permutation costs the task most AUC."""
        drop = self.drop
        per_task = {t: average_ranks([drop[f][t] for f in self.fields]) for t in self.tasks}
        return {f: {t: per_task[t][i] for t in self.tasks} for i, f in enumerate(self.fields)}

    def mean_drop(self, name: str) -> float:
        values = [v for v in self.drop[name].values() if not math.isnan(v)]
        return sum(values) / len(values) if values else math.nan

    def ordered_fields(self) -> list[str]:
        """Fields by mean AUC drop over the tasks, largest first."""
        return sorted(  # a field without a number (NaN: no AUC) goes last
            self.fields, key=lambda f: -self.mean_drop(f) if not math.isnan(self.mean_drop(f)) else math.inf
        )

    def spearman(self) -> list[dict[str, Any]]:
        """Per task pair ``{"tasks": [a, b], "spearman": rho}`` of their drop vectors."""
        drop = self.drop
        return [
            {
                "tasks": [a, b],
                "spearman": spearman([drop[f][a] for f in self.fields], [drop[f][b] for f in self.fields]),
            }
            for a, b in combinations(self.tasks, 2)
        ]

    def divergent_fields(self, top: int = _DIVERGENT_SHOWN) -> list[dict[str, Any]]:
        """The fields whose AUC drop differs most between two tasks (largest gap first).

        By the gap in AUC drop, not in rank: among the many fields whose drops are all near zero,
        ranks are noise, and a large rank spread there would mean nothing.
        """
        if len(self.tasks) < 2:
            return []
        drop, ranks = self.drop, self.ranks
        rows = []
        for f in self.fields:
            if any(math.isnan(drop[f][t]) for t in self.tasks):
                continue
            hi = max(self.tasks, key=lambda t: drop[f][t])
            lo = min(self.tasks, key=lambda t: drop[f][t])
            rows.append(
                {
                    "field": f,
                    "drop_gap": drop[f][hi] - drop[f][lo],
                    "rank_spread": ranks[f][lo] - ranks[f][hi],
                    "most_important_for": hi,
                    "least_important_for": lo,
                    "ranks": ranks[f],
                }
            )
        rows.sort(key=lambda r: -r["drop_gap"])
        return [r for r in rows if r["drop_gap"] > 1e-9][:top]  # float noise is no gap

    def to_json(self) -> dict[str, Any]:
        return _finite(
            {
                **self.source,
                "tasks": self.tasks,
                "fields": self.ordered_fields(),
                "baseline": self.baseline,
                "baseline_auc": {t: self.baseline[t]["auc"] for t in self.tasks},
                "auc_drop": self.drop,
                "rank": self.ranks,
                "permuted": self.permuted,
                "spearman": self.spearman(),
                "divergent_fields": self.divergent_fields(),
            }
        )


def _finite(value: Any) -> Any:
    """NaN and infinities as null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def permutation_importance(
    evaluate: Evaluate,
    fields: Sequence[str],
    baseline: Metrics | None = None,
    source: dict[str, Any] | None = None,
) -> ImportanceResult:
    """One evaluation per field with that field permuted (and one baseline unless ``baseline`` is
    given, e.g. the trainer's final evaluation of the same model on the same data).

    Example::

        result = permutation_importance(lambda f: evaluator.evaluate(files, f), ["user_id", "item_id"])
    """
    if not fields:
        raise ValueError("permutation importance needs at least one sparse field")
    if len(set(fields)) != len(fields):
        raise ValueError(f"permutation importance: fields {list(fields)} repeat a field")
    start = time.perf_counter()
    baseline = baseline if baseline else evaluate(None)
    permuted: dict[str, Metrics] = {}
    for i, name in enumerate(fields):
        permuted[name] = evaluate(name)
        drops = "  ".join(f"{t} {baseline[t]['auc'] - m['auc']:+.4f}" for t, m in permuted[name].items())
        logger.info("importance %d/%d: %s permuted | AUC drop %s", i + 1, len(fields), name, drops)
    logger.info("importance: %d evaluations in %.1f s", len(fields), time.perf_counter() - start)
    return ImportanceResult(list(fields), list(baseline), baseline, permuted, dict(source or {}))


def _number(value: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.{digits}f}"


def _rank(value: float) -> str:
    return f"{value:g}"


def importance_markdown(result: ImportanceResult) -> str:
    """The report: AUC drops (field rows x task columns with each task's rank), baselines,
    the Spearman correlation of every task pair and the fields whose ranks differ most."""
    drop, ranks, tasks = result.drop, result.ranks, result.tasks
    lines = ["# Permutation feature importance", ""]
    if result.source:
        where = ", ".join(
            f"{k} {result.source[k]}" for k in ("run_dir", "step", "epoch") if k in result.source
        )
        lines += [f"Model: {where}.", ""]
    lines += [
        "AUC drop per task when one sparse field's values are permuted among the evaluation rows "
        "(within read slices of up to max(batch, 1024) consecutive rows; larger = more important; "
        "rank 1 = most important for that task), sorted by the mean drop.",
        "",
        "| field | " + " | ".join(f"{t} ΔAUC | {t} rank" for t in tasks) + " | mean ΔAUC |",
        "|---|" + "---:|---:|" * len(tasks) + "---:|",
    ]
    for f in result.ordered_fields():
        cells = " | ".join(f"{_number(drop[f][t])} | {_rank(ranks[f][t])}" for t in tasks)
        lines.append(f"| {f} | {cells} | {_number(result.mean_drop(f))} |")
    lines += [
        "",
        "Baseline AUC (nothing permuted): "
        + ", ".join(f"{t} {result.baseline[t]['auc']:.4f}" for t in tasks)
        + ".",
        "",
    ]
    pairs = result.spearman()
    if pairs:
        lines += [
            "## Divergence between tasks",
            "",
            "Spearman rank correlation of the tasks' AUC-drop vectors (1: the same order of "
            "importance, 0: unrelated, -1: reversed).",
            "",
            "| task pair | Spearman |",
            "|---|---:|",
        ]
        lines += [f"| {a} / {b} | {_number(p['spearman'], 3)} |" for p in pairs for a, b in [p["tasks"]]]
        lines.append("")
        divergent = result.divergent_fields()
        if divergent:
            lines += ["Fields whose importance differs most between tasks (largest gap in AUC drop):", ""]
            for d in divergent:
                per_task = ", ".join(f"{t} {_rank(r)}" for t, r in d["ranks"].items())
                lines.append(
                    f"- {d['field']}: AUC-drop gap {_number(d['drop_gap'])} "
                    f"(most important for {d['most_important_for']}; ranks: {per_task})"
                )
            lines.append("")
    return "\n".join(lines)


def importance_chart(result: ImportanceResult, path: Path) -> None:
    """Grouped horizontal bars: one group per field (most important on top), one bar per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = result.ordered_fields()[::-1]  # barh draws bottom-up
    drop, tasks = result.drop, result.tasks
    height = 0.8 / len(tasks)
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.35 * len(fields) * max(1, len(tasks) / 2)))
    for j, t in enumerate(tasks):
        ys = [i - 0.4 + height * (j + 0.5) for i in range(len(fields))]
        ax.barh(ys, [0.0 if math.isnan(drop[f][t]) else drop[f][t] for f in fields], height, label=t)
    ax.set_yticks(range(len(fields)), fields)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("AUC drop when the field is permuted")
    ax.set_title("Permutation feature importance per task")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_importance(result: ImportanceResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``importance.json``, ``importance.md`` and ``importance.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"importance.{name}" for name in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(result.to_json(), indent=2) + "\n")
    paths["md"].write_text(importance_markdown(result))
    importance_chart(result, paths["png"])
    return paths


def importance_from_run(
    run_dir: str | Path,
    step: int | None = None,
    data: list[str] | None = None,
    out: str | Path | None = None,
    batch_size: int | None = None,
    fields: list[str] | None = None,
) -> tuple[ImportanceResult, dict[str, Path]]:
    """Permutation importance of a saved run's checkpoint ``step`` (None: the best, else the
    latest) on ``data`` (default: the run's ``data.eval``), written to ``out`` (default:
    ``RUN_DIR/importance``); ``batch_size`` default: ``importance.batch_size``, else ``training.batch_size``.

    Raises:
        FileNotFoundError: no run directory, config.yaml or data.
        CheckpointError: no such checkpoint.
        ValueError: a field of ``fields`` that is not a configured sparse feature.
    """
    from towerrec.data.config import resolve_paths
    from towerrec.trainer.evaluate import RunEvaluator

    evaluator = RunEvaluator(run_dir, step, batch_size)
    if batch_size is None and evaluator.config.importance.batch_size is not None:
        evaluator.batch_size = evaluator.config.importance.batch_size
    known = evaluator.sparse_fields
    unknown = [f for f in fields or [] if f not in known]
    if unknown:
        raise ValueError(f"fields {unknown} are not sparse features of {run_dir}; sparse features: {known}")
    files = resolve_paths(
        list(data) if data else list(evaluator.config.data.eval), "--data" if data else "data.eval"
    )
    base = evaluator.dataset(files)  # footers read once; each pass only changes the permuted field

    def evaluate(name: str | None) -> Metrics:
        return evaluator.evaluate_dataset(base if name is None else base.with_permutation(name))

    result = permutation_importance(
        evaluate,
        fields or known,
        source={**evaluator.source(), "data": files},
    )
    return result, write_importance(result, out if out is not None else Path(run_dir) / "importance")
