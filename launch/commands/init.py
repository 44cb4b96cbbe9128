"""``towerrec init``: a commented, ready config from the user's own Parquet files.

Example::

    towerrec init --data 'data/train/*.parquet' --eval 'data/valid/*.parquet' \\
        --label income --label never_married --out configs/mine.yaml
    towerrec train --config configs/mine.yaml

The files' footers and a seeded sample of their rows (``data.profile``) decide one entry per
column; the comment above each entry in the written file says why. The rules:

* label columns (``--label``) become tasks; every sampled value must be 0 or 1 (and every footer
  min/max inside [0, 1]), else an error names the column, the values, a file and row.
* categorical: string and bool columns, integer columns named like identifiers (``id``, ``*_id``,
  ``*_code``, ``*_key``, ``userId``, ...), integers beyond 2^53 (hashed keys), ``--categorical``
  columns, and lists of strings or integers (``multi_hot``). At most ``VOCAB_MAX_DISTINCT``
  distinct values (estimated over all rows when sampled) -> ``id_mode: vocab`` with a table of
  V + 1 rows (row 0: unseen and rare values), V the distinct count (times ``VOCAB_HEADROOM`` when
  the sample had values seen once, so the estimate exceeds the count), rounded up to a multiple of
  8; more -> ``id_mode: hash`` into the power of two >= 2x the distinct count, at most
  ``HASH_MAX_ROWS`` rows. The table is the feature's own, named after it.
* other integers with at most ``SMALL_INT_DISTINCT`` distinct values (counts, codes, flags): a
  vocab embedding and, with 3+ values, a dense input ``<column>_value``; other integers and floats
  are numeric.
* numeric -> a dense input: ``standardize``; first ``log1p`` when skewed and never negative, or
  ``clip`` to the sample's 0.1 %/99.9 % quantiles when skewed with negative values. Skewed: an
  extreme more than ``SKEW_RATIO`` times as far from the median as the 1st/99th percentile, or a
  median of 0 under a positive 99th percentile (mostly zeros and a long tail: money, counts).
  With at least 4 distinct values also a ``<column>_bucket`` embedding, ``id_mode: bucketize,
  quantiles: 16``; for mostly zeros explicit ``boundaries`` instead: 0 in bucket 0, the positive
  values of the sample in 16 quantile buckets (as ``data.public`` does for Census money columns).
  NaN or infinity in the sample: no dense input (the loader passes NaN on; the bucket embedding
  takes NaN as null).
* nulls (in the sample, or in any file's footer statistics): vocab -> ``on_null: default`` (row 0,
  the out-of-vocabulary row); hash, bucketize and lists -> ``on_null: empty`` (an empty bag, a zero
  vector); dense -> ``on_null: default, default: 0.0`` (the training mean after standardize).
* ``embedding_dim``: 8 for tables up to 128 rows, 16 up to 16384, else 32.
* skipped with a comment: struct/map/binary/temporal columns, lists of floats, columns missing in a
  file, columns with one value or none, ``--ignore`` columns, and any entry the loader's own type
  check (``data.transforms.column_type_ok``) would reject.
* ``model``: PLE (the ``towerrec data synth`` shape) for >= 2 tasks, ``single_task`` for one;
  ``training``: ``data.config.ready_training_section()``.
* evaluation: ``--eval`` files; without it the last 20 % of the training files (at least one) are
  held out; with a single file evaluation reads the training file, and a note says so. Statistics
  (vocabularies, means, quantiles) are fitted by ``towerrec train`` on the training files only.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from towerrec.launch.commands.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Subparsers,
    add_parser_to,
    positive_int,
)

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    from towerrec.data.profile import ColumnLayout, ColumnProfile, DataProfile

VOCAB_MAX_DISTINCT = 10_000
VOCAB_HEADROOM = 1.5
HASH_MAX_ROWS = 2**22
SMALL_INT_DISTINCT = 32
QUANTILES = 16
SKEW_RATIO = 10.0
EVAL_FILE_SHARE = 0.2
# Identifier-like names: a category even when the values are integers.
ID_NAME = re.compile(r"(^|_)(id|ids|code|codes|key|hash|uuid|guid)$|[a-z0-9](Id|ID|Ids|IDs|Key|Code)$", re.I)


def add_parser(subparsers: Subparsers) -> None:
    parser = add_parser_to(
        subparsers,
        "init",
        help="write a ready config for your own Parquet files",
        description=(
            "Read the footers and a seeded sample of your Parquet files (types, nulls, distinct\n"
            "counts, ranges, list lengths) and write a commented config: a task per --label\n"
            "(0/1 columns), an embedding per categorical column (vocab or hash, sized from the\n"
            "distinct count), standardized dense inputs (log1p or clip first when skewed) and\n"
            "quantile-bucket embeddings for numbers. Each choice has its reason in a comment.\n"
            "Quote globs so the shell does not expand them.\n\n"
            "example:\n"
            "  towerrec init --data 'data/train/*.parquet' --eval 'data/valid/*.parquet' \\\n"
            "      --label click --label conversion --out configs/mine.yaml\n"
            "  towerrec train --config configs/mine.yaml"
        ),
    )
    parser.add_argument(
        "--data", required=True, nargs="+", metavar="GLOB", help="training files: globs, files or directories"
    )
    parser.add_argument(
        "--label", required=True, action="append", metavar="COL", help="a 0/1 label column (repeatable)"
    )
    parser.add_argument(
        "--eval",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="evaluation files (None: the last 20%% of the training files are held out)",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="config file to write")
    parser.add_argument(
        "--sample_rows",
        "--sample-rows",
        type=positive_int,
        default=200_000,
        metavar="N",
        help="rows read to profile the data, spread over the row groups",
    )
    parser.add_argument("--run_dir", default=None, metavar="DIR", help="run_dir (None: runs/<name of --out>)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the row sample")
    parser.add_argument(
        "--ignore", action="append", default=[], metavar="COL", help="a column not to use (repeatable)"
    )
    parser.add_argument(
        "--categorical",
        action="append",
        default=[],
        metavar="COL",
        help="an integer column to read as a category, not a number (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.set_defaults(handler=run)


# ------------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    """The entries of the config's data section, each with the comment that says why."""

    tables: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    sparse: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    dense: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    tasks: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)  # columns, features and tables: taken names

    def unique(self, name: str) -> str:
        """``name``, or ``name_2``, ``name_3``, ... if a column, feature or table has it already."""
        candidate, k = name, 1
        while candidate in self.names:
            k += 1
            candidate = f"{name}_{k}"
        self.names.add(candidate)
        return candidate

    def add_sparse(self, entry: dict[str, Any], rows: int, why: str, table_why: str) -> None:
        """A sparse feature and its own table (named after the feature)."""
        table = {"name": entry["table"], "num_embeddings": rows, "embedding_dim": embedding_dim(rows)}
        self.tables.append((table, table_why))
        self.sparse.append((entry, why))


def embedding_dim(rows: int) -> int:
    """8 for tables up to 128 rows, 16 up to 16384, else 32: more rows, more to tell apart."""
    return 8 if rows <= 128 else 16 if rows <= 16384 else 32


def vocab_rows(distinct: int, certain: bool) -> int:
    """Rows of a vocab table: the values plus row 0 (out of vocabulary), ``VOCAB_HEADROOM`` x the
    values unless the count is ``certain``, rounded up to a multiple of 8."""
    values = distinct if certain else math.ceil(distinct * VOCAB_HEADROOM)
    return 8 * math.ceil((values + 1) / 8)


def hash_rows(distinct: int) -> int:
    """The power of two >= 2x ``distinct`` (few collisions), at least 16, at most ``HASH_MAX_ROWS``."""
    return min(HASH_MAX_ROWS, 1 << max(4, math.ceil(math.log2(max(2 * distinct, 1)))))


def _count(c: ColumnProfile) -> str:
    """``9 distinct`` (every row read), ``9 distinct in the sample``, or ``~48000 distinct
    (estimated; 31000 in the sample)``."""
    if c.exact:
        return f"{c.distinct} distinct"
    if c.distinct_estimate == c.distinct:
        return f"{c.distinct} distinct in the sample"
    return f"~{c.distinct_estimate} distinct (estimated; {c.distinct} in the sample)"


def _nulls(c: ColumnProfile) -> str:
    parts = []
    if c.nulls:
        parts.append(f"{c.nulls} null rows in the sample")
    if c.null_elements:
        parts.append(f"{c.null_elements} null elements in the sample")
    if c.file_nulls and not c.nulls:
        parts.append(f"{c.file_nulls} nulls in the files")
    return ", ".join(parts)


def _loader_rejects(entry: dict[str, Any], layout: ColumnLayout, sparse: bool) -> str:
    """Why the loader cannot read ``layout``'s column for ``entry`` ('' if it can): the loader's
    own type check (``data.transforms``), so init never writes what training rejects."""
    from towerrec.data.config import DenseFeatureConfig, SparseFeatureConfig
    from towerrec.data.transforms import column_type_ok, expected_type

    feature = SparseFeatureConfig(**entry) if sparse else DenseFeatureConfig(**entry)
    if layout.arrow_type is None or column_type_ok(feature, layout.arrow_type):
        return ""
    return f"{layout.type}: the loader reads {expected_type(feature)}"


def _categorical(plan: Plan, c: ColumnProfile, layout: ColumnLayout, why_kind: str) -> None:
    """A vocab or hash embedding of column ``c`` (a list column: multi_hot), in a table of its own."""
    entry: dict[str, Any] = {"name": c.name, "table": c.name}
    multi = c.kind.startswith("list<")
    if multi:
        entry["multi_hot"] = True
    count = _count(c)
    if c.distinct_estimate <= VOCAB_MAX_DISTINCT:
        # Headroom only for an estimate: a sample without singletons saw every value (GEE agrees).
        certain = c.exact or c.distinct_estimate == c.distinct
        rows = vocab_rows(c.distinct_estimate, certain)
        entry["id_mode"] = "vocab"
        why = f"{why_kind}, {count} -> vocab"
        headroom = "" if certain else f" x{VOCAB_HEADROOM} (headroom for an estimate)"
        table_why = f"{c.distinct_estimate} values{headroom} + row 0 (unseen/rare), rounded up to 8"
    else:
        rows = hash_rows(c.distinct_estimate)
        entry["id_mode"] = "hash"
        why = f"{why_kind}, {count} (> {VOCAB_MAX_DISTINCT}) -> hash into 2^{rows.bit_length() - 1} rows"
        capped = f", capped at {HASH_MAX_ROWS}" if rows == HASH_MAX_ROWS else ""
        table_why = f"a power of two >= 2x the distinct count{capped}"
    if multi and c.list_lengths is not None:
        lo, mean, hi = c.list_lengths
        why += f"; lists of {lo}..{hi} values (mean {mean:.1f})"
    if c.any_nulls:
        if entry["id_mode"] == "vocab" and not multi:
            entry["on_null"] = "default"
            why += f"; nulls seen ({_nulls(c)}) -> on_null: default (row 0, the out-of-vocabulary row)"
        else:
            entry["on_null"] = "empty"
            why += f"; nulls seen ({_nulls(c)}) -> on_null: empty (no ids: a zero vector)"
    rejected = _loader_rejects(entry, layout, sparse=True)
    if rejected:
        plan.skipped.append((c.name, rejected))
        return
    plan.add_sparse(entry, rows, f"{c.name}: {why}", table_why)


def _mostly_zeros(c: ColumnProfile) -> bool:
    """Never negative, a median of 0 and a positive 99th percentile: money and counts."""
    return c.min is not None and c.min >= 0 and c.q50 == 0 and c.q99 is not None and c.q99 > 0


def _skew(c: ColumnProfile) -> str:
    """Why the column is skewed ('' if it is not): mostly zeros with a long tail, or an extreme
    more than ``SKEW_RATIO`` times as far from the median as the 1st/99th percentile."""
    lo, q01, q50, q99, hi = c.min, c.q01, c.q50, c.q99, c.max
    if lo is None or q01 is None or q50 is None or q99 is None or hi is None:
        return ""
    stats = f"min {_fmt(lo)}, p1 {_fmt(q01)}, median {_fmt(q50)}, p99 {_fmt(q99)}, max {_fmt(hi)}"
    if _mostly_zeros(c):
        return f"skewed ({stats}: mostly zeros, a long tail)"
    if hi - q50 > SKEW_RATIO * (q99 - q50) or q50 - lo > SKEW_RATIO * (q50 - q01):
        return f"skewed ({stats}: an extreme > {SKEW_RATIO:.0f}x as far from the median as p1/p99)"
    return ""


def zero_bucket_boundaries(values: np.ndarray, quantiles: int = QUANTILES) -> list[float]:
    """Boundaries that give 0 (and anything below the smallest positive value) bucket 0 and split
    the positive values into ``quantiles`` quantile buckets (``data.public``'s treatment of the
    Census money columns): the smallest positive value, then the positive values' i/Q quantiles.

    Example::

        zero_bucket_boundaries(np.array([0, 0, 0, 5.0, 10.0, 20.0]), quantiles=2)  # [5.0, 10.0]
    """
    import numpy as np

    positive = values[np.isfinite(values) & (values > 0)]
    edges = np.quantile(positive, np.arange(1, quantiles) / quantiles)
    return [float(b) for b in np.unique(np.concatenate([[positive.min()], edges]))]


def _numeric(
    plan: Plan, c: ColumnProfile, layout: ColumnLayout, values: pa.ChunkedArray, why_kind: str
) -> None:
    """A dense input of column ``c`` and, with 4+ distinct values, a bucket embedding."""
    span = f"{_fmt(c.min)}..{_fmt(c.max)}"
    if c.nonfinite:
        plan.skipped.append(
            (
                c.name,
                f"{why_kind}: {c.nonfinite} NaN/infinite values in the sample would reach the model as "
                "they are, so no dense input (the bucket embedding takes NaN as null); write nulls "
                "instead and rerun towerrec init",
            )
        )
    else:
        entry: dict[str, Any] = {"name": c.name}
        skew = _skew(c)
        if not skew:
            entry["transforms"] = ["standardize"]
            why_dense = f"{why_kind} {span} -> standardize"
        elif c.min is not None and c.min >= 0:
            entry["transforms"] = ["log1p", "standardize"]
            why_dense = f"{why_kind}, {skew}, never negative -> log1p + standardize"
        else:
            entry["transforms"] = ["clip", "standardize"]
            entry["clip"] = [_round(c.q001), _round(c.q999)]
            why_dense = f"{why_kind}, {skew}, negatives -> clip to the 0.1%/99.9% quantiles + standardize"
        if c.any_nulls:
            entry.update(on_null="default", default=0.0)
            why_dense += f"; nulls seen ({_nulls(c)}) -> on_null: default, 0.0 (the training mean)"
        rejected = _loader_rejects(entry, layout, sparse=False)
        if rejected:
            plan.skipped.append((c.name, rejected))
            return
        plan.dense.append((entry, f"{c.name}: {why_dense}"))
    if c.distinct < 4:
        return
    name = plan.unique(f"{c.name}_bucket")
    bucket: dict[str, Any] = {"name": name, "column": c.name, "table": name, "id_mode": "bucketize"}
    if _mostly_zeros(c):
        import numpy as np

        # Quantiles of mostly zeros merge into one or two buckets: split the positive values instead.
        x = values.drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
        bucket["boundaries"] = zero_bucket_boundaries(x)
        rows = len(bucket["boundaries"]) + 1
        why = (
            f"{c.name} also as an embedding: mostly zeros, so 0 -> bucket 0 and the positive values "
            f"in {QUANTILES} quantile buckets of the training sample (explicit boundaries)"
        )
        table_why = f"{len(bucket['boundaries'])} boundaries + 1"
    else:
        bucket["quantiles"] = QUANTILES
        rows = QUANTILES
        why = f"{c.name} also as an embedding: {QUANTILES} quantile buckets fitted on the training files"
        table_why = f"{QUANTILES} buckets at most"
    if c.any_nulls or c.nonfinite:
        bucket["on_null"] = "empty"
        why += "; nulls (and NaN) -> on_null: empty"
    if not _loader_rejects(bucket, layout, sparse=True):
        plan.add_sparse(bucket, rows, f"{name}: {why}", table_why)


def _fmt(x: float | None) -> str:
    """A number for a comment: integers whole, others to 4 significant digits (whole from 1000)."""
    if x is None:
        return "?"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.0f}" if 1000 <= abs(x) < 1e15 else f"{x:.4g}"


def _round(x: float | None) -> float:
    return float(f"{x:.6g}") if x is not None else 0.0


def _column(
    plan: Plan, c: ColumnProfile, layout: ColumnLayout, values: pa.ChunkedArray, categorical: set[str]
) -> None:
    """The entries of one feature column (module docstring: the rules)."""
    kind, what = c.kind, c.type + (f" ({c.note})" if c.note else "")
    if c.distinct == 0:
        plan.skipped.append((c.name, f"{what}: null in every sampled row"))
    elif kind.startswith("list<") and c.element_kind == "float":
        plan.skipped.append((c.name, f"{what}: lists of floats have no transform (sparse lists are ids)"))
    elif kind.startswith("list<"):
        _categorical(plan, c, layout, what)
    elif c.distinct == 1 and not c.any_nulls:
        plan.skipped.append((c.name, f"{what}: one value ({c.top[0][0]!r}) in every sampled row: no signal"))
    elif kind in ("string", "bool"):
        _categorical(plan, c, layout, what)
    elif kind == "integer" and (c.name in categorical or ID_NAME.search(c.name)):
        reason = "--categorical" if c.name in categorical else "named like an identifier"
        _categorical(plan, c, layout, f"{what}, {reason}")
    elif kind == "integer" and max(abs(c.min or 0), abs(c.max or 0)) >= 2**53:
        _categorical(plan, c, layout, f"{what}, values beyond 2^53 (hashed keys, not quantities)")
    elif kind == "integer" and c.distinct_estimate <= SMALL_INT_DISTINCT:
        small = f"{what}, a small integer (<= {SMALL_INT_DISTINCT} values): a category"
        _categorical(plan, c, layout, small)
        if c.distinct <= 2:  # a flag: the category says it all
            return
        name = plan.unique(f"{c.name}_value")
        entry: dict[str, Any] = {"name": name, "column": c.name, "transforms": ["standardize"]}
        why = f"{name}: {c.name} also as a number {_fmt(c.min)}..{_fmt(c.max)} -> standardize"
        if c.any_nulls:
            entry.update(on_null="default", default=0.0)
            why += "; nulls -> on_null: default, 0.0 (the training mean)"
        plan.dense.append((entry, why))
    elif c.distinct == 1:
        plan.skipped.append((c.name, f"{what}: one value besides nulls (write its presence as a 0/1 column)"))
    else:
        _numeric(plan, c, layout, values, what)


def check_label(profile: DataProfile, name: str) -> str:
    """The task comment of label column ``name`` after checking it is 0/1.

    Raises:
        ProfileError: the column is missing in a file, is not numeric/bool, or holds a null or a
            value other than 0 and 1 (naming the file and row, or the file and row group).
    """
    from towerrec.data.profile import ProfileError, footer_nulls, footer_ranges

    layout = profile.layouts.get(name)
    if layout is None:
        raise ProfileError(
            f"label column {name!r} is in none of the files; {profile.files[0]} has columns "
            f"{list(profile.layouts)}"
        )
    if layout.missing_in:
        raise ProfileError(f"label column {name!r} is missing in {layout.missing_in[0]}")
    if layout.kind not in ("integer", "bool", "float"):
        raise ProfileError(
            f"label column {name!r} has type {layout.type}; a label is 0 or 1 "
            "(an integer, bool or float column)"
        )
    column = profile.sample.column(name)
    if column.null_count:
        row = column.is_null().to_numpy(zero_copy_only=False).argmax()
        raise ProfileError(
            f"label column {name!r} is null at {profile.where(int(row))}; a label must be 0 or 1"
        )
    c = profile.columns[name]
    values = sorted(v for v, _ in c.top)
    x = column.to_numpy().astype("float64")
    bad = ((x != 0) & (x != 1)).nonzero()[0]
    if bad.size:
        shown = sorted(set(x[bad[:1000]].tolist()) | set(float(v) for v in values))[:10]
        raise ProfileError(
            f"label column {name!r} has values {_values(shown)} in the sample; first one not 0 or 1: "
            f"{_fmt(x[bad[0]])} at {profile.where(int(bad[0]))}; a task's label must be 0 or 1"
        )
    for schema in profile.footers:
        if footer_nulls([schema], name):
            raise ProfileError(
                f"label column {name!r} has {footer_nulls([schema], name)} nulls in {schema.path} (its "
                "footer statistics); a task's label must be 0 or 1"
            )
        for group, lo, hi in footer_ranges(schema, name):
            if float(lo) < 0 or float(hi) > 1:
                raise ProfileError(
                    f"label column {name!r} ranges {lo}..{hi} in {schema.path}, row group {group} "
                    "(its footer statistics); a task's label must be 0 or 1"
                )
    positives = float(x.sum())
    rate = positives / max(x.size, 1)
    note = "" if 0 < positives < x.size else "; WARNING: one class only in the sample (AUC undefined)"
    return f"{name}: {layout.type}, {rate:.2%} positive in the sample{note}"


def _values(values: list[float]) -> str:
    return "[" + ", ".join(_fmt(v) for v in values) + "]"


def plan_config(
    profile: DataProfile,
    labels: list[str],
    ignore: tuple[str, ...] = (),
    categorical: tuple[str, ...] = (),
) -> Plan:
    """Tasks, tables and features for ``profile`` (module docstring: the rules).

    Example::

        plan = plan_config(profile_files(files), ["click"])
        [entry["id_mode"] for entry, why in plan.sparse]  # ["vocab", "hash", "bucketize", ...]
    """
    from towerrec.data.profile import ProfileError

    for option, names in (("--ignore", ignore), ("--categorical", categorical)):
        for name in names:
            if name not in profile.layouts:
                raise ValueError(f"{option} {name!r}: no such column; columns: {list(profile.layouts)}")
    for name in categorical:
        if profile.layouts[name].kind not in ("integer", "string", "bool"):
            raise ValueError(
                f"--categorical {name!r}: the column has type {profile.layouts[name].type}; "
                "only integer columns can be read as categories (strings and bools are already)"
            )
    plan = Plan(names=set(profile.layouts))
    for name in labels:
        plan.tasks.append(({"name": name, "label": name}, check_label(profile, name)))
    for name, layout in profile.layouts.items():
        if name in labels:
            continue
        if name in ignore:
            plan.skipped.append((name, "--ignore"))
        elif layout.kind == "unsupported":
            plan.skipped.append((name, f"{layout.type}: not a type the loader reads (flatten or convert it)"))
        elif layout.kind == "null":
            plan.skipped.append((name, "null in every file"))
        elif layout.missing_in:
            plan.skipped.append((name, f"missing in {layout.missing_in[0]}"))
        else:
            _column(plan, profile.columns[name], layout, profile.sample.column(name), set(categorical))
    if not plan.sparse:
        raise ProfileError(
            "no column gives an embedding (a string, bool, identifier or list column, or a number with "
            f"4+ distinct values); skipped: {dict(plan.skipped)}"
        )
    return plan


# ---------------------------------------------------------------------------------- the YAML text


def _flow(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9).strip()


def _block(value: dict[str, Any], indent: str = "") -> list[str]:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=False, sort_keys=False, width=10**9)
    return [indent + line for line in text.splitlines()]


def _entries(key: str, items: list[tuple[dict[str, Any], str]], above: bool) -> list[str]:
    lines = [f"  {key}:"]
    for entry, why in items:
        if above:
            lines += [f"  # {why}", f"  - {_flow(entry)}"]
        else:
            lines.append(f"  - {_flow(entry)}  # {why}")
    return lines


def model_section(tasks: int) -> dict[str, Any]:
    """PLE in the shape ``towerrec data synth`` writes for 2+ tasks; ``single_task`` for one."""
    from towerrec.data.synth import synthetic_config

    if tasks >= 2:
        return synthetic_config("unused")["model"]
    return {"type": "single_task", "hidden": [128, 64], "tower_hidden": [64, 32]}


def render_config(
    profile: DataProfile,
    plan: Plan,
    train: list[str],
    eval_: list[str],
    eval_note: str,
    run_dir: str,
    command: str,
) -> str:
    """The config file's text: header, run_dir, data (entries commented), model, training."""
    from towerrec.data.config import ready_training_section

    spread = "every row" if profile.exact else f"a seeded sample of {profile.sampled_rows} rows"
    lines = [
        f"# Written by: {command}",
        f"# From {len(profile.files)} training file(s), {profile.rows} rows; profiled on {spread} (seed "
        f"{profile.seed}) and the footers of every file.",
        "# The comment above each entry says why it was chosen (rules: launch/commands/init.py).",
        "# Vocabularies, means and quantiles are fitted on the training files by `towerrec train`",
        "# (saved in RUN_DIR/features.json).",
        "# Edit freely, then: towerrec train --config THIS_FILE",
        *_block({"run_dir": run_dir}),
        "data:",
        *_block({"train": train if len(train) > 1 else train[0]}, "  "),
    ]
    if eval_note:
        lines.append(f"  # {eval_note}")
    lines += _block({"eval": eval_ if len(eval_) > 1 else eval_[0]}, "  ")
    lines += _entries("tables", plan.tables, above=False)
    lines += _entries("sparse_features", plan.sparse, above=True)
    if plan.dense:
        lines += _entries("dense_features", plan.dense, above=True)
    lines += _entries("tasks", plan.tasks, above=True)
    if plan.skipped:
        lines.append("  # not used:")
        lines += [f"  #   {name}: {why}" for name, why in plan.skipped]
    model = model_section(len(plan.tasks))
    lines.append(f"# {model['type']}: " + ("PLE for 2+ tasks" if len(plan.tasks) > 1 else "one task"))
    lines += _block({"model": model})
    lines += _block({"training": ready_training_section()})
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- the command


def split_files(train: list[str], eval_: list[str] | None) -> tuple[list[str], list[str], str]:
    """Training files, evaluation files and the note on how evaluation was chosen."""
    if eval_:
        overlap = sorted(set(train) & set(eval_))
        if overlap:
            raise ValueError(
                f"--eval: {overlap[0]} is also a training file (--data); evaluation must be held out"
            )
        return train, eval_, "evaluation files (--eval): never fitted on"
    if len(train) == 1:
        return (
            train,
            train,
            "NOTE: no --eval and one file: evaluation reads the TRAINING file (optimistic metrics); "
            "point eval at held-out rows",
        )
    held = max(1, round(len(train) * EVAL_FILE_SHARE))
    return (
        train[:-held],
        train[-held:],
        f"no --eval: the last {held} of {len(train)} files are held out for evaluation (never fitted on); "
        "pass --eval to choose",
    )


def run(args: argparse.Namespace) -> int:
    """``towerrec init``."""
    from towerrec.data.config import resolve_paths
    from towerrec.data.files import atomic_output
    from towerrec.data.profile import ProfileError, profile_files

    if os.path.exists(args.out) and not args.force:
        print(f"error: --out {args.out} exists; pass --force to overwrite it", file=sys.stderr)
        return EXIT_USAGE
    labels = list(dict.fromkeys(args.label))
    try:
        files = resolve_paths(args.data, "--data")
        train, eval_, eval_note = split_files(
            files, resolve_paths(args.eval, "--eval") if args.eval else None
        )
        also = [f for f in eval_ if f not in train]
        profile = profile_files(train, args.sample_rows, args.seed, also=also)
        plan = plan_config(profile, labels, tuple(args.ignore), tuple(args.categorical))
    except ProfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    # The paths as given (globs stay globs), unless the training files were split by file here.
    split = not args.eval and len(files) > 1
    train_paths = train if split else list(args.data)
    eval_paths = eval_ if split else list(args.eval or args.data)
    run_dir = args.run_dir or os.path.join("runs", os.path.splitext(os.path.basename(args.out))[0])
    text = render_config(profile, plan, train_paths, eval_paths, eval_note, run_dir, _command(args))
    with atomic_output(args.out) as tmp:
        tmp.write_text(text)
    return _report(args.out, profile, plan, eval_note)


def _command(args: argparse.Namespace) -> str:
    """The command line that wrote the file, for its header."""
    import shlex

    words = ["towerrec", "init", "--data", *args.data]
    words += [w for label in dict.fromkeys(args.label) for w in ("--label", label)]
    words += ["--eval", *args.eval] if args.eval else []
    words += [w for name in args.ignore for w in ("--ignore", name)]
    words += [w for name in args.categorical for w in ("--categorical", name)]
    words += ["--out", args.out, "--sample_rows", str(args.sample_rows), "--seed", str(args.seed)]
    return " ".join(shlex.quote(w) for w in words)


def _report(out: str, profile: DataProfile, plan: Plan, eval_note: str) -> int:
    """Print the decisions, check the written file loads, and say what to run next."""
    from towerrec.trainer.config import ConfigError, load_config

    print(f"profiled: {len(profile.files)} files, {profile.rows} rows ({profile.sampled_rows} sampled)")
    for _, why in plan.tasks:
        print(f"task:     {why}")
    for _, why in plan.sparse + plan.dense:
        print(f"feature:  {why}")
    for name, why in plan.skipped:
        print(f"skipped:  {name}: {why}")
    print(f"eval:     {eval_note}")
    try:
        load_config(out)
    except ConfigError as e:
        print(f"error: the written config {out} does not load (please report this): {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"config:   {os.path.abspath(out)}")
    print(f"next:     towerrec train --config {out}")
    return EXIT_OK
