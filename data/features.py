"""Statistics of the training files that feature transforms use: vocabularies, quantile
boundaries, means and standard deviations; fitted in one streaming pass, stored with the run.

Example::

    if FittedFeatures.needs_fit(config.data):
        fitted = FittedFeatures.fit(train_files, config.data)
        fitted.save(run_dir / "features.json")
    fitted = FittedFeatures.load(run_dir / "features.json")
    fitted.check(config.data)  # fitted for this config?

What is fitted (only from the files given, which are the training files; nulls are ignored):

* ``id_mode: vocab``: the values seen at least ``min_count`` times, by count descending then
  value; or the lines of ``vocab_file`` (read once here, so the run keeps its own copy). Entry i
  (from 0) gets id i + 1; id 0 is out of vocabulary. A vocabulary longer than the table's
  ``num_embeddings - 1`` keeps its first ``num_embeddings - 1`` entries and records how many it
  dropped (``dropped``, also logged). Counting: pyarrow ``value_counts`` per record batch, merged
  with a group-by every million distinct values or so.
* ``bucketize: quantiles: Q``: the Q-quantiles ``i/Q`` (i = 1..Q-1, numpy's linear method),
  deduplicated, of the finite values; exact up to ``SAMPLE_SIZE`` values, else over a uniform
  sample of ``SAMPLE_SIZE`` of them (each value draws a random key; the smallest keys are kept),
  seeded by ``seed`` and the feature name.
* ``standardize``: mean and population std of the finite values as they reach that step (after
  the transforms before it); a std of 0 is stored as 1.

``features.json``::

    {"version": 1, "fitted_on": [files],
     "features": {name: {"vocab": [...], "oov_id": 0, "dropped": n, "fitted_for": {...}}
                        | {"boundaries": [...], "fitted_for": {...}}
                        | {"mean": x, "std": y, "fitted_for": {...}}}}

``fitted_for`` records the config fields the statistics depend on (column, min_count, ...);
``check`` rejects a file fitted for another config. Floats are written as shortest round-trip
decimals, so they load back bit for bit.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from towerrec.data.config import DataConfig, DenseFeatureConfig, SparseFeatureConfig
from towerrec.data.errors import DataError, Where
from towerrec.data.hashing import mix64
from towerrec.data.transforms import (
    apply_dense_transforms,
    check_type_drift,
    column_type_ok,
    expected_type,
    string_hashes,
)

logger = logging.getLogger(__name__)

FEATURES_FILE = "features.json"
VERSION = 1
SAMPLE_SIZE = 1_000_000  # values kept per quantile feature
_READ_ROWS = 65_536  # rows per record batch while fitting
_MERGE_ROWS = 1 << 20  # pending (value, count) rows that trigger a merge of vocabulary counts


# ---- fitted statistics ----------------------------------------------------------------------


class _KeyIndex:
    """Position of each of a set of distinct, well-mixed uint64 keys. A direct-mapped table of
    2-4x as many slots as keys answers most lookups with one random read; a key whose slot holds
    another key falls back to a binary search of all keys, sorted. Vectorised, no probe loop, so
    small lookups (a loader slice) cost a fixed handful of numpy calls.

    Example::

        _KeyIndex(np.array([7, 3], np.uint64)).find(np.array([3, 5], np.uint64))  # [1, -1]
    """

    def __init__(self, keys: np.ndarray) -> None:
        capacity = 1 << max(3, int(2 * len(keys) - 1).bit_length())
        self.mask = np.uint64(capacity - 1)
        self.slot_keys = np.zeros(capacity, np.uint64)
        self.slot_positions = np.full(capacity, -1, np.int32)
        slots = keys & self.mask
        taken, first_of = np.unique(slots, return_index=True)  # one key per slot: the first
        self.slot_keys[taken] = keys[first_of]
        self.slot_positions[taken] = first_of
        self.order = np.argsort(keys).astype(np.int32)
        self.sorted_keys = keys[self.order]

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Position (int64) of each key, -1 for a key not in the set."""
        slots = keys & self.mask
        positions = self.slot_positions[slots].astype(np.int64)
        match = self.slot_keys[slots] == keys
        found = np.where(match, positions, -1)  # an empty slot has position -1 whatever matched
        rest = np.flatnonzero((positions >= 0) & ~match)  # the slot holds another key
        if len(rest):
            at = np.minimum(np.searchsorted(self.sorted_keys, keys[rest]), len(self.sorted_keys) - 1)
            hit = self.sorted_keys[at] == keys[rest]
            found[rest[hit]] = self.order[at[hit]]
        return found


@dataclass(frozen=True)
class Vocab:
    """A vocabulary: ``values[i]`` has id ``i + 1``; anything else ``oov_id`` (0)."""

    values: list[str] | list[int]
    dropped: int  # values that qualified but did not fit the table
    fitted_for: dict[str, Any]
    oov_id: ClassVar[int] = 0

    def ids(self, column: pa.Array, name: str = "") -> np.ndarray:
        """Ids (int64) of the values of a string or integer array without nulls.

        Looked up in an open-addressing table of 64-bit keys (``mix64`` of the integer, or the
        string's ``hash_strings``), built once; a string hit is confirmed by comparing the strings
        themselves, so the result is exact whatever the hashes do.
        """
        if len(self.values) == 0:
            return np.zeros(len(column), np.int64)
        is_string = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        if is_string != isinstance(self.values[0], str):
            raise DataError(
                f"column {name!r} has type {column.type}, but its fitted vocabulary holds "
                f"{type(self.values[0]).__name__} values: refit (remove {FEATURES_FILE})"
            )
        if not is_string:
            return self._index.find(mix64(column.cast(pa.int64(), safe=False).to_numpy())) + 1
        if self._index is None:  # two entries share a 64-bit hash: let Arrow look them up
            index = pc.index_in(column, value_set=self._typed(column.type))
            return index.fill_null(-1).to_numpy().astype(np.int64) + 1
        found = self._index.find(string_hashes(column))
        hit = np.flatnonzero(found >= 0)
        # Confirm the hits: unequal strings with equal hashes are possible, if unlikely.
        same = pc.equal(column.take(pa.array(hit)), self._typed(column.type).take(pa.array(found[hit])))
        found[hit[~same.to_numpy(zero_copy_only=False)]] = -1
        return found + 1

    @functools.cached_property
    def _array(self) -> pa.Array:
        return pa.array(self.values, pa.large_string() if isinstance(self.values[0], str) else pa.int64())

    def _typed(self, t: pa.DataType) -> pa.Array:
        """The values as an array of type ``t`` (string or large_string), cast once per type."""
        if t not in self._casts:
            self._casts[t] = self._array.cast(t)
        return self._casts[t]

    @functools.cached_property
    def _casts(self) -> dict[pa.DataType, pa.Array]:
        return {}

    @functools.cached_property
    def _index(self) -> _KeyIndex | None:
        """None if two string entries share a 64-bit hash (integers cannot: mix64 is a bijection)."""
        if isinstance(self.values[0], str):
            keys = string_hashes(self._array)
            if len(np.unique(keys)) < len(keys):
                return None
            return _KeyIndex(keys)
        return _KeyIndex(mix64(self._array.to_numpy()))

    def to_json(self) -> dict[str, Any]:
        return {
            "vocab": list(self.values),
            "oov_id": self.oov_id,
            "dropped": self.dropped,
            "fitted_for": self.fitted_for,
        }


@dataclass(frozen=True)
class Boundaries:
    """Fitted bucket boundaries, strictly increasing."""

    boundaries: list[float]
    fitted_for: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"boundaries": list(self.boundaries), "fitted_for": self.fitted_for}


@dataclass(frozen=True)
class Moments:
    """Mean and std (never 0) for ``standardize``."""

    mean: float
    std: float
    fitted_for: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "fitted_for": self.fitted_for}


Stats = Vocab | Boundaries | Moments


def _fitted_for(feature: SparseFeatureConfig | DenseFeatureConfig, data: DataConfig) -> dict[str, Any]:
    """The config fields ``feature``'s statistics depend on."""
    if isinstance(feature, DenseFeatureConfig):
        before = feature.transforms[: feature.transforms.index("standardize")]
        return {
            "column": feature.parquet_column,
            "transforms": list(before),
            "clip": list(feature.clip) if "clip" in before and feature.clip is not None else None,
        }
    if feature.id_mode == "vocab":
        return {
            "column": feature.parquet_column,
            "min_count": feature.min_count or 1,
            "vocab_file": feature.vocab_file,
            "num_embeddings": data.table(feature.table).num_embeddings,
        }
    return {"column": feature.parquet_column, "quantiles": feature.quantiles}


def _stats_kind(feature: SparseFeatureConfig | DenseFeatureConfig) -> str:
    if isinstance(feature, DenseFeatureConfig):
        return "moments"
    return "vocab" if feature.id_mode == "vocab" else "boundaries"


_KIND: dict[str, tuple[type, str]] = {
    "vocab": (Vocab, "vocabulary"),
    "boundaries": (Boundaries, "boundaries"),
    "moments": (Moments, "mean and std"),
}


def _fitted_features(data: DataConfig) -> list[SparseFeatureConfig | DenseFeatureConfig]:
    return [f for f in data.sparse_features if f.needs_fit] + [
        f for f in data.dense_feature_configs if f.needs_fit
    ]


class FittedFeatures:
    """The fitted statistics of a run, by feature name (module docstring)."""

    def __init__(self, fitted_on: list[str], features: dict[str, Stats], source: str | None = None) -> None:
        self.fitted_on = list(fitted_on)
        self.features = dict(features)
        self.source = source  # the file it was loaded from, for messages

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FittedFeatures)
            and self.fitted_on == other.fitted_on
            and self.features == other.features
        )

    @staticmethod
    def needs_fit(data: DataConfig) -> bool:
        """Whether any feature of ``data`` uses fitted statistics."""
        return bool(_fitted_features(data))

    def _get(self, name: str, kind: type[Stats], what: str) -> Any:
        stats = self.features.get(name)
        if not isinstance(stats, kind):
            raise ValueError(
                f"{self.source or 'fitted features'}: feature {name!r} has no fitted {what}; "
                f"fitted: {sorted(self.features)} (refit: remove the file)"
            )
        return stats

    def vocab(self, name: str) -> Vocab:
        return self._get(name, Vocab, "vocabulary")

    def boundaries(self, name: str) -> np.ndarray:
        return np.asarray(self._get(name, Boundaries, "boundaries").boundaries, np.float64)

    def moments(self, name: str) -> Moments:
        return self._get(name, Moments, "mean and std")

    def check(self, data: DataConfig) -> None:
        """Raise ValueError unless these statistics were fitted for ``data``'s features."""
        where = self.source or "fitted features"
        for feature in _fitted_features(data):
            stats = self._get(feature.name, *_KIND[_stats_kind(feature)])
            expected = _fitted_for(feature, data)
            if stats.fitted_for != expected:
                raise ValueError(
                    f"{where}: feature {feature.name!r} was fitted for {stats.fitted_for}, the config "
                    f"now says {expected}; refit (remove the file) or restore the config"
                )
            if isinstance(stats, Boundaries) and isinstance(feature, SparseFeatureConfig):
                size = data.table(feature.table).num_embeddings
                if len(stats.boundaries) + 1 > size:
                    needed = len(stats.boundaries) + 1
                    raise ValueError(
                        f"{where}: feature {feature.name!r} has {needed - 1} fitted boundaries; "
                        f"table {feature.table!r} needs num_embeddings >= {needed}, has {size}"
                    )

    # ---- fitting ----

    @classmethod
    def fit(
        cls, files: list[str], data: DataConfig, seed: int = 0, sample_size: int = SAMPLE_SIZE
    ) -> FittedFeatures:
        """One streaming pass over ``files`` (the training files only) in bounded memory.

        Raises:
            DataError: a missing column, a column of the wrong type or drifting type, a bad
                value (e.g. ``<= -1`` before log1p), naming the file (and row).
            ValueError: nothing to fit from, or fitted boundaries that do not fit the table.
        """
        features = _fitted_features(data)
        if not features:
            return cls(files, {})
        if not files:
            raise ValueError(
                f"features {[f.name for f in features]} need fitting, but no training file was given"
            )
        columns = list(dict.fromkeys(f.parquet_column for f in features))
        types = check_type_drift(files, columns)
        for path in files:
            schema = pq.read_schema(path)
            for feature in features:
                found = schema.field(feature.parquet_column).type
                if not column_type_ok(feature, found):
                    raise DataError(
                        f"{path}: column {feature.parquet_column!r} has type {found}; "
                        f"expected {expected_type(feature)} ({feature.name!r})"
                    )
        fitters = [_fitter(f, data, seed, sample_size) for f in features]
        for path in files:
            parquet = pq.ParquetFile(path)
            first_row = 0
            for group in range(parquet.num_row_groups):
                row = first_row
                for batch in parquet.iter_batches(batch_size=_READ_ROWS, row_groups=[group], columns=columns):
                    where = Where(path, group, row)
                    for fitter in fitters:
                        fitter.update(batch.column(fitter.feature.parquet_column), where)
                    row += batch.num_rows
                first_row += parquet.metadata.row_group(group).num_rows
            parquet.close()
        stats = {f.feature.name: f.finish(types[f.feature.parquet_column]) for f in fitters}
        return cls(files, stats)

    # ---- the file ----

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "fitted_on": self.fitted_on,
            "features": {name: stats.to_json() for name, stats in self.features.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` atomically (a reader never sees half a file)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1, allow_nan=False, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FittedFeatures:
        """Read and validate a ``features.json``.

        Raises:
            ValueError: naming the file and the missing, unknown or mistyped field.
        """
        path = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        return cls.from_json(raw, path)

    @classmethod
    def from_json(cls, raw: Any, source: str) -> FittedFeatures:
        """The statistics of an already parsed ``features.json`` (``to_json`` output carried in a
        broadcast or an artifact's schema), validated as ``load`` validates the file.

        Example::

            FittedFeatures.from_json(artifact.schema["features"], "model.pt")

        Raises:
            ValueError: naming ``source`` (where ``raw`` came from) and the missing, unknown or
                mistyped field.
        """
        return cls(*_parse(raw, source), source=source)


# ---- reading features.json ------------------------------------------------------------------


class _Reader:
    """Typed access to the fields of a parsed JSON object, with errors naming file and field."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.path}: field {field!r} {problem}")

    def obj(self, value: Any, field: str, keys: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, f"must be an object, not {type(value).__name__}")
        missing, unknown = sorted(keys - set(value)), sorted(set(value) - keys)
        if missing:
            raise self.fail(f"{field}.{missing[0]}" if field else missing[0], "is missing")
        if unknown:
            raise self.fail(
                f"{field}.{unknown[0]}" if field else unknown[0], f"is unknown; expected {sorted(keys)}"
            )
        return value

    def number(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(field, f"must be a finite number, not {value!r}")
        return float(value)

    def integer(self, value: Any, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"must be an integer, not {value!r}")
        return value

    def items(self, value: Any, field: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(field, f"must be a list, not {type(value).__name__}")
        return value


_KEYS = {
    "vocab": {"vocab", "oov_id", "dropped", "fitted_for"},
    "boundaries": {"boundaries", "fitted_for"},
    "mean": {"mean", "std", "fitted_for"},
}


def _parse(raw: Any, path: str) -> tuple[list[str], dict[str, Stats]]:
    r = _Reader(path)
    top = r.obj(raw, "", {"version", "fitted_on", "features"})
    if r.integer(top["version"], "version") != VERSION:
        raise r.fail("version", f"is {top['version']}; this towerrec reads version {VERSION}")
    fitted_on = r.items(top["fitted_on"], "fitted_on")
    for i, name in enumerate(fitted_on):
        if not isinstance(name, str):
            raise r.fail(f"fitted_on[{i}]", f"must be a file name, not {name!r}")
    if not isinstance(top["features"], dict):
        raise r.fail("features", f"must be an object, not {type(top['features']).__name__}")
    features: dict[str, Stats] = {}
    for name, record in top["features"].items():
        field = f"features.{name}"
        if not isinstance(record, dict):
            raise r.fail(field, f"must be an object, not {type(record).__name__}")
        kind = next((k for k in ("vocab", "boundaries", "mean") if k in record), None)
        if kind is None:
            raise r.fail(field, f"must have one of the fields vocab, boundaries, mean; has {sorted(record)}")
        record = r.obj(record, field, _KEYS[kind])
        if not isinstance(record["fitted_for"], dict):
            raise r.fail(f"{field}.fitted_for", "must be an object")
        features[name] = _parse_stats(r, kind, record, field)
    return fitted_on, features


def _parse_stats(r: _Reader, kind: str, record: dict[str, Any], field: str) -> Stats:
    if kind == "vocab":
        values = r.items(record["vocab"], f"{field}.vocab")
        value_type = str if values and isinstance(values[0], str) else int
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, value_type):
                raise r.fail(
                    f"{field}.vocab[{i}]", f"must be a {value_type.__name__} like entry 0, not {value!r}"
                )
        if len(set(values)) != len(values):
            raise r.fail(f"{field}.vocab", "has a value twice")
        if record["oov_id"] != Vocab.oov_id or isinstance(record["oov_id"], bool):
            raise r.fail(f"{field}.oov_id", f"must be {Vocab.oov_id}, not {record['oov_id']!r}")
        dropped = r.integer(record["dropped"], f"{field}.dropped")
        if dropped < 0:
            raise r.fail(f"{field}.dropped", f"must be >= 0, not {dropped}")
        return Vocab(values, dropped, record["fitted_for"])
    if kind == "boundaries":
        items = r.items(record["boundaries"], f"{field}.boundaries")
        b = [r.number(x, f"{field}.boundaries[{i}]") for i, x in enumerate(items)]
        if not b or b != sorted(set(b)):
            raise r.fail(f"{field}.boundaries", "must be a non-empty, strictly increasing list")
        return Boundaries(b, record["fitted_for"])
    std = r.number(record["std"], f"{field}.std")
    if std <= 0:
        raise r.fail(f"{field}.std", f"must be > 0, not {std}")
    return Moments(r.number(record["mean"], f"{field}.mean"), std, record["fitted_for"])


# ---- fitters: one per fitted feature, fed record batch by record batch ----------------------


class _Fitter:
    def __init__(self, feature: SparseFeatureConfig | DenseFeatureConfig, data: DataConfig) -> None:
        self.feature = feature
        self.fitted_for = _fitted_for(feature, data)

    def update(self, column: pa.Array, where: Where) -> None:
        pass

    def finish(self, column_type: pa.DataType) -> Stats:
        raise NotImplementedError


def _fitter(
    feature: SparseFeatureConfig | DenseFeatureConfig, data: DataConfig, seed: int, sample_size: int
) -> _Fitter:
    if isinstance(feature, DenseFeatureConfig):
        return _MomentsFitter(feature, data)
    size = data.table(feature.table).num_embeddings
    if feature.id_mode == "bucketize":
        rng = np.random.default_rng([seed, zlib.crc32(feature.name.encode())])
        return _QuantileFitter(feature, data, size, rng, sample_size)
    if feature.vocab_file is not None:
        return _VocabFileFitter(feature, data, size)
    return _VocabFitter(feature, data, size)


def _keep_top(fitter: _Fitter, values: list[Any], size: int, source: str) -> Vocab:
    """The first ``size - 1`` of ``values`` (row 0 is the out-of-vocabulary id), saying so if fewer."""
    feature = fitter.feature
    assert isinstance(feature, SparseFeatureConfig)
    dropped = max(0, len(values) - (size - 1))
    if dropped:
        logger.warning(
            "feature %r: %s has %d values; table %r (num_embeddings=%d) keeps the first %d, "
            "%d go to the out-of-vocabulary id 0",
            feature.name, source, len(values), feature.table, size, size - 1, dropped,
        )  # fmt: skip
    return Vocab(values[: size - 1], dropped, fitter.fitted_for)


class _VocabFitter(_Fitter):
    """Counts values with ``value_counts`` per batch; merges the counts now and then."""

    def __init__(self, feature: SparseFeatureConfig, data: DataConfig, size: int) -> None:
        super().__init__(feature, data)
        self.size = size
        self.pending: list[pa.StructArray] = []
        self.pending_rows = 0
        self.merged_rows = 0

    def update(self, column: pa.Array, where: Where) -> None:
        values = (
            column.flatten()
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            else column
        )
        values = values.drop_null()
        # One type per kind, so files of string and large_string (int32 and int64) merge.
        values = values.cast(pa.large_string() if pa.types.is_string(values.type) else values.type)
        if pa.types.is_integer(values.type):
            values = values.cast(pa.int64(), safe=False)
        if len(values) == 0:
            return
        counts = pc.value_counts(values)
        self.pending.append(counts)
        self.pending_rows += len(counts)
        if self.pending_rows >= max(_MERGE_ROWS, 2 * self.merged_rows):
            self._merge()

    def _merge(self) -> pa.Table:
        if not self.pending:
            return pa.table({"values": pa.array([], pa.large_string()), "counts": pa.array([], pa.int64())})
        values = pa.concat_arrays([p.field("values") for p in self.pending])
        counts = np.concatenate([p.field("counts").to_numpy() for p in self.pending])
        # Sum the counts of equal values: dictionary indices as bins (Arrow's group_by is slower).
        encoded = pc.dictionary_encode(values)
        sums = np.bincount(encoded.indices.to_numpy(), weights=counts, minlength=len(encoded.dictionary))
        merged = pa.StructArray.from_arrays(
            [encoded.dictionary, pa.array(sums.astype(np.int64))], ["values", "counts"]
        )
        self.pending = [merged]
        self.pending_rows = self.merged_rows = len(merged)
        return pa.Table.from_struct_array(merged)

    def finish(self, column_type: pa.DataType) -> Stats:
        merged = self._merge()
        min_count = self.feature.min_count or 1
        merged = merged.filter(pc.greater_equal(merged["counts"], min_count))
        merged = merged.sort_by([("counts", "descending"), ("values", "ascending")])
        values = merged["values"].to_pylist()
        if not values:
            logger.warning(
                "feature %r: no value of column %r occurs %d times or more in the training files: "
                "every value gets the out-of-vocabulary id 0",
                self.feature.name,
                self.feature.parquet_column,
                min_count,
            )
        return _keep_top(self, values, self.size, "the fitted vocabulary")


class _VocabFileFitter(_Fitter):
    """Reads ``vocab_file``: one value per line (integers for an integer column)."""

    def __init__(self, feature: SparseFeatureConfig, data: DataConfig, size: int) -> None:
        super().__init__(feature, data)
        self.size = size

    def finish(self, column_type: pa.DataType) -> Stats:
        path = self.feature.vocab_file
        assert path is not None
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        integer = pa.types.is_integer(
            column_type.value_type
            if pa.types.is_list(column_type) or pa.types.is_large_list(column_type)
            else column_type
        )
        values: list[Any] = []
        seen: dict[Any, int] = {}
        for number, line in enumerate(lines, start=1):
            if line == "":
                raise ValueError(f"{path}: line {number} is empty; expected one vocabulary value per line")
            try:
                value = int(line) if integer else line
            except ValueError:
                raise ValueError(
                    f"{path}: line {number}: {line!r} is not an integer; column "
                    f"{self.feature.parquet_column!r} has type {column_type}"
                ) from None
            if value in seen:
                raise ValueError(f"{path}: line {number}: {line!r} repeats line {seen[value]}")
            seen[value] = number
            values.append(value)
        return _keep_top(self, values, self.size, f"vocab_file {path}")


class _QuantileFitter(_Fitter):
    """A uniform sample of at most ``sample_size`` finite values: the ones with the smallest
    random keys (bottom-k sampling, mergeable batch by batch)."""

    def __init__(
        self,
        feature: SparseFeatureConfig,
        data: DataConfig,
        size: int,
        rng: np.random.Generator,
        sample_size: int,
    ) -> None:
        super().__init__(feature, data)
        self.size = size
        self.rng = rng
        self.k = sample_size
        self.values = np.zeros(0, np.float64)
        self.keys = np.zeros(0, np.float64)
        self.threshold = np.inf  # keys above it can never enter the sample
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_rows = 0

    def update(self, column: pa.Array, where: Where) -> None:
        x = column.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls read as NaN
        x = x[np.isfinite(x)]
        keys = self.rng.random(len(x))
        keep = keys < self.threshold
        self.pending.append((x[keep], keys[keep]))
        self.pending_rows += int(keep.sum())
        if self.pending_rows >= self.k:
            self._merge()

    def _merge(self) -> None:
        values = np.concatenate([self.values] + [v for v, _ in self.pending])
        keys = np.concatenate([self.keys] + [k for _, k in self.pending])
        self.pending, self.pending_rows = [], 0
        if len(keys) > self.k:
            keep = np.argpartition(keys, self.k - 1)[: self.k]
            values, keys = values[keep], keys[keep]
            self.threshold = float(keys.max())
        self.values, self.keys = values, keys

    def finish(self, column_type: pa.DataType) -> Stats:
        self._merge()
        feature = self.feature
        if len(self.values) == 0:
            raise ValueError(
                f"feature {feature.name!r}: column {feature.parquet_column!r} has no finite value in the "
                "training files to fit quantiles on"
            )
        q = feature.quantiles
        assert q is not None
        boundaries = [float(b) for b in np.unique(np.quantile(self.values, np.arange(1, q) / q))]
        if len(boundaries) + 1 > self.size:
            raise ValueError(
                f"feature {feature.name!r}: {len(boundaries)} fitted boundaries make {len(boundaries) + 1} "
                f"buckets; table {feature.table!r} has num_embeddings={self.size}"
            )
        return Boundaries(boundaries, self.fitted_for)


class _MomentsFitter(_Fitter):
    """Count, mean and sum of squared deviations, merged batch by batch (Chan et al.)."""

    def __init__(self, feature: DenseFeatureConfig, data: DataConfig) -> None:
        super().__init__(feature, data)
        self.stop = feature.transforms.index("standardize")
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, column: pa.Array, where: Where) -> None:
        assert isinstance(self.feature, DenseFeatureConfig)
        x = column.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls read as NaN
        x = apply_dense_transforms(x, self.feature, None, where, stop=self.stop)
        x = x[np.isfinite(x)]
        if len(x) == 0:
            return
        n, mean = len(x), float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def finish(self, column_type: pa.DataType) -> Stats:
        if self.count == 0:
            raise ValueError(
                f"feature {self.feature.name!r}: column {self.feature.parquet_column!r} has no finite value "
                "in the training files to fit a mean and std on"
            )
        std = math.sqrt(self.m2 / self.count)
        return Moments(self.mean, std if std > 0 else 1.0, self.fitted_for)
