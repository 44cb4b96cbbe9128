"""Bad-input errors of the data path, and where in the files a value came from.

Example::

    where = Where("data/part-0.parquet", row_group=1, first_row=4096)
    raise where.error("user_id", 7, None, "a non-null integer id")
    # DataError: data/part-0.parquet: row group 1, column 'user_id', row 4103: value None; expected ...
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np
import pyarrow as pa


class DataError(ValueError):
    """Bad input data; the message names file, row group, column, row, value and expectation."""


class ErrorSite(Protocol):
    """Anything that turns (column, row index of the slice, value, expectation) into a DataError."""

    def error(self, column: str, index: int, value: object, expected: str, note: str = "") -> DataError: ...


class Where(NamedTuple):
    """Where a slice of rows came from, for error messages."""

    path: str
    row_group: int
    first_row: int  # row index within the file of the slice's row 0

    def error(self, column: str, index: int, value: object, expected: str, note: str = "") -> DataError:
        return DataError(
            f"{self.path}: row group {self.row_group}, column {column!r}, "
            f"row {self.first_row + index}: value {value!r}{note}; expected {expected}"
        )


class Shifted(NamedTuple):
    """``site`` seen from ``offset`` rows further on: for a chunk of a longer column."""

    site: ErrorSite
    offset: int

    def error(self, column: str, index: int, value: object, expected: str, note: str = "") -> DataError:
        return self.site.error(column, self.offset + index, value, expected, note)


def first(mask: pa.Array | np.ndarray) -> int:
    """Index of the first true element of a boolean mask (0 if none is)."""
    return int(np.argmax(np.asarray(mask)))
