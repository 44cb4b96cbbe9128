"""Test AUC of scikit-learn's HistGradientBoostingClassifier per task, on a `towerrec data` split:
the gradient-boosting baseline issue 11 compares the models with.

    towerrec data census --out runs/census-raw --raw
    python -m benchmarks.gbdt --dataset census --data runs/census-raw
    python -m benchmarks.gbdt --dataset census --data runs/census-raw --learning_rates 0.05 0.1 \\
        --max_leaf_nodes 31 63                        # a small grid, chosen on validation

Needs scikit-learn >= 1.7 (``pip install -e .[bench]``). Protocol: the features and tasks are
the ones of ``DATA/config.yaml``, read from ``DATA/{train,valid,test}/*.parquet``:

* a sparse feature's column (``id_mode`` other than ``bucketize``) is a categorical feature:
  ordinal codes by training frequency (``data.public.vocabulary``, fitted on train only); the
  ``MAX_CATEGORIES`` most frequent training values get codes 0..254, other and unseen values are
  missing (HistGradientBoosting's own bin); passed with a ``categorical_features`` mask;
* a dense feature's column is numeric, as it is in the file (raw values for ``--raw`` data);
  ``bucketize`` features are left out (they bucket a numeric column the model already has);
* a task with ``sample_space: T`` trains and is scored on the rows where T's label is 1.

One model per task and setting, grown while the loss on the validation split improves (sklearn's
early stopping given ``X_val``: ``--patience`` trees without a gain stop it, at most
``--max_iter``); the tree count with the best validation AUC (checked every ``--chunk`` trees)
and the grid setting with the best validation AUC are chosen, and only then is the test split
scored, once per task. Results go to the ``gbdt-DATASET`` section of docs/RESULTS.md
(``--results``).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from towerrec.data.config import DataConfig, TaskConfig
from towerrec.data.public import SPLITS, vocabulary
from towerrec.trainer.config import ConfigError, load_config

from benchmarks.report import RESULTS_MD, markdown_table, write_section

MAX_CATEGORIES = 255  # HistGradientBoosting's categories must be codes below max_bins (255)
EXIT_USAGE = 2
MIN_SKLEARN = (1, 7)


@dataclass(frozen=True)
class Columns:
    """The Parquet columns the model reads: categorical ones (ordinal codes) and numeric ones."""

    categorical: list[str]
    numeric: list[str]

    @property
    def all(self) -> list[str]:
        return self.categorical + self.numeric


def feature_columns(data: DataConfig) -> Columns:
    """Categorical and numeric columns of a config (module docstring), each once, in config order.

    Example::

        feature_columns(load_config("runs/census-raw/config.yaml").data).categorical[:2]
        # ['class_worker', 'det_ind_code']

    Raises:
        ValueError: a multi-hot sparse feature (a list per row: no single column value to split on).
    """
    multi = [f.name for f in data.sparse_features if f.multi_hot]
    if multi:
        raise ValueError(f"multi-hot sparse features {multi}: gbdt takes one value per row and column")
    numeric = list(dict.fromkeys(f.parquet_column for f in data.dense_feature_configs))
    categorical = [f.parquet_column for f in data.sparse_features if f.id_mode != "bucketize"]
    categorical = [c for c in dict.fromkeys(categorical) if c not in numeric]
    return Columns(categorical, numeric)


def read_split(data_dir: Path, split: str, columns: list[str]) -> pa.Table:
    files = sorted(glob.glob(os.path.join(data_dir, split, "*.parquet")))
    if not files:
        raise FileNotFoundError(f"{data_dir / split}: no *.parquet file (written by `towerrec data`?)")
    return pq.read_table(files, columns=columns)


def ordinal_codes(train: pa.ChunkedArray) -> pa.Array:
    """The training values that get codes 0.. (by frequency), at most ``MAX_CATEGORIES``."""
    return pa.array(vocabulary(train.drop_null())[:MAX_CATEGORIES], train.type)


def matrix(table: pa.Table, columns: Columns, codes: dict[str, pa.Array]) -> np.ndarray:
    """float64 ``[rows, features]``: ordinal codes, then numeric values; NaN for missing."""
    out = np.empty((table.num_rows, len(columns.all)), np.float64)
    for j, c in enumerate(columns.categorical):
        index = pc.index_in(table.column(c), value_set=codes[c])  # null: unseen, rare or null
        out[:, j] = index.to_numpy(zero_copy_only=False)
    for j, c in enumerate(columns.numeric, start=len(columns.categorical)):
        out[:, j] = pc.cast(table.column(c), pa.float64()).to_numpy(zero_copy_only=False)
    return out


@dataclass
class TaskData:
    """One task's rows of one split: features and 0/1 labels."""

    x: np.ndarray
    y: np.ndarray


def task_rows(x: np.ndarray, table: pa.Table, task: TaskConfig, tasks: list[TaskConfig]) -> TaskData:
    """The rows a task counts (its ``sample_space`` task's label is 1, or all) and its labels."""
    y = table.column(task.label).to_numpy().astype(np.int64)
    if task.sample_space is None:
        return TaskData(x, y)
    space = next(t for t in tasks if t.name == task.sample_space)
    keep = table.column(space.label).to_numpy() == 1
    return TaskData(x[keep], y[keep])


@dataclass
class Fit:
    """The chosen model of one task: its setting, trees, validation and test AUC."""

    params: dict[str, Any]
    trees: int
    valid_auc: float
    seconds: float
    model: Any = None
    test_auc: float = float("nan")


def fit_on_valid(
    train: TaskData,
    valid: TaskData,
    params: dict[str, Any],
    categorical: np.ndarray,
    args: argparse.Namespace,
) -> Fit:
    """One model grown while the validation loss improves; the tree count of its best validation
    AUC (checked every ``args.chunk`` trees)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    start = time.perf_counter()
    model = HistGradientBoostingClassifier(
        categorical_features=categorical,
        early_stopping=True,
        scoring="loss",  # updated tree by tree; an AUC scorer would re-predict every tree each time
        n_iter_no_change=args.patience,
        max_iter=args.max_iter,
        random_state=args.seed,
        **params,
    )
    model.fit(train.x, train.y, X_val=valid.x, y_val=valid.y)  # the valid split, not a slice of train
    best = Fit(params, 0, -1.0, 0.0, model)
    for trees, p in enumerate(model.staged_predict_proba(valid.x), start=1):
        if trees % args.chunk == 0 or trees == model.n_iter_:
            auc = float(roc_auc_score(valid.y, p[:, 1]))
            if auc > best.valid_auc:
                best.trees, best.valid_auc = trees, auc
    best.seconds = time.perf_counter() - start
    return best


def score_test(fit: Fit, test: TaskData) -> float:
    """AUC on test of the first ``fit.trees`` trees (the model may have grown more)."""
    from sklearn.metrics import roc_auc_score

    for trees, p in enumerate(fit.model.staged_predict_proba(test.x), start=1):
        if trees == fit.trees:
            return float(roc_auc_score(test.y, p[:, 1]))
    raise AssertionError(f"the model has fewer than {fit.trees} trees")


def run(args: argparse.Namespace) -> tuple[list[list[object]], list[str]]:
    """Fit and score every task; (table rows, notes)."""
    data = load_config(args.data / "config.yaml").data
    columns = feature_columns(data)
    labels = list(dict.fromkeys(t.label for t in data.tasks))
    tables = {s: read_split(args.data, s, columns.all + labels) for s in SPLITS}
    codes = {c: ordinal_codes(tables["train"].column(c)) for c in columns.categorical}
    x = {s: matrix(t, columns, codes) for s, t in tables.items()}
    categorical = np.arange(len(columns.all)) < len(columns.categorical)
    grid = [
        {"learning_rate": lr, "max_leaf_nodes": leaves}
        for lr, leaves in itertools.product(args.learning_rates, args.max_leaf_nodes)
    ]
    rows = []
    for task in data.tasks:
        split = {s: task_rows(x[s], tables[s], task, data.tasks) for s in SPLITS}
        fits = [fit_on_valid(split["train"], split["valid"], p, categorical, args) for p in grid]
        best = max(fits, key=lambda f: f.valid_auc)
        best.test_auc = score_test(best, split["test"])  # the test split, read once per task
        print(f"{task.name}: {best.params}, {best.trees} trees: valid AUC {best.valid_auc:.4f}", end="")
        print(f", test AUC {best.test_auc:.4f}", flush=True)
        rows.append(
            [
                task.name,
                "/".join(str(len(split[s].y)) for s in SPLITS),
                int(split["test"].y.sum()),
                f"lr {best.params['learning_rate']}, {best.params['max_leaf_nodes']} leaves",
                best.trees,
                f"{best.valid_auc:.4f}",
                f"**{best.test_auc:.4f}**",
                f"{sum(f.seconds for f in fits):.0f}",
            ]
        )
    notes = [
        f"{len(columns.categorical)} categorical columns (ordinal codes fitted on train, at most "
        f"{MAX_CATEGORIES} per column): {columns.categorical}",
        f"{len(columns.numeric)} numeric columns, as in the files: {columns.numeric}",
    ]
    return rows, notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=["census", "hillstrom"], required=True, help="names the section")
    parser.add_argument("--data", type=Path, required=True, help="directory written by `towerrec data`")
    parser.add_argument("--learning_rates", nargs="+", type=float, default=[0.1], metavar="LR")
    parser.add_argument("--max_leaf_nodes", nargs="+", type=int, default=[31], metavar="N")
    parser.add_argument("--max_iter", type=int, default=1000, help="most trees per model")
    parser.add_argument("--patience", type=int, default=30, help="trees without a validation-loss gain")
    parser.add_argument("--chunk", type=int, default=5, help="trees between validation-AUC checks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OpenMP threads (default: every core); 1 is faster on a machine busy with other work",
    )
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="the Markdown file to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import sklearn
    except ImportError:
        sklearn = None
    version = tuple(int(v) for v in sklearn.__version__.split(".")[:2]) if sklearn else ()
    if version < MIN_SKLEARN:  # 1.7: fit(X_val=, y_val=), early stopping on our validation split
        found = (
            f"scikit-learn {sklearn.__version__} is too old" if sklearn else "scikit-learn is not installed"
        )
        print(
            f"error: benchmarks.gbdt needs scikit-learn >= 1.7 ({found}): pip install -e .[bench]",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    start = time.perf_counter()
    try:
        with threadpool_limits(args.threads):  # None: every core
            rows, notes = run(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    header = ["task", "rows train/valid/test", "test positives", "setting", "trees", "valid AUC"]
    header += ["test AUC", "fit s"]
    body = (
        f"scikit-learn {sklearn.__version__} HistGradientBoostingClassifier, one model per task on "
        f"`{args.data}` (a split written by `towerrec data {args.dataset}`, with the features and tasks of "
        f"its config.yaml; `--raw`: the original columns); trees and setting chosen on "
        f"validation (grid: learning rate {args.learning_rates} x max_leaf_nodes {args.max_leaf_nodes}; "
        f"grown until {args.patience} trees bring no gain in validation loss, at most {args.max_iter}; "
        f"trees: the best validation AUC every {args.chunk} trees), test read once per task. "
        f"Wall time {time.perf_counter() - start:.0f} s (OpenMP threads: {args.threads or 'all'}; "
        "measured under load: other jobs shared the cores).\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        + "\n".join(f"- {n}" for n in notes)
    )
    title = f"{args.dataset.capitalize()}: scikit-learn gradient boosting (test AUC)"
    write_section(f"gbdt-{args.dataset}", title, body, path=args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
