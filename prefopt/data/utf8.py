"""Text that is not UTF-8: refused when a split is loaded, and reported by file and line.

pyarrow's JSON reader keeps a string's bytes as they are, so a file with a stray Latin-1 byte loads
without a word and fails later, deep in the conversion to Python, naming neither file nor row. Checking
every string of a loaded split is one pass of pyarrow's validator (gigabytes a second); only when it fails
are the data files read again, line by line, to name where the bad byte is.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
from typing import BinaryIO, Callable

import datasets
import pyarrow as pa

from prefopt.errors import PrefoptError

__all__ = ["check_utf8", "not_utf8"]

# Formats whose files are text, so a bad byte has a line; parquet and arrow files are named by row instead.
TEXT_SUFFIXES = (".json", ".jsonl", ".csv")
OPENERS: dict[str, Callable[[str], BinaryIO]] = {
    "": lambda file: open(file, "rb"), ".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open,
}


def check_utf8(path: str, split: str, rows: datasets.Dataset, files: list[str]) -> None:
    """Raise ``not_utf8`` when a string of ``rows`` is not UTF-8; ``files`` are the local files read."""
    table = rows.data.table
    try:
        table.validate(full=True)
    except pa.ArrowInvalid as exc:
        if "UTF8" not in str(exc):
            return  # other damage is not this check's to report; what reads the rows reports it as before
        raise not_utf8(path, split, files, table) from None


def not_utf8(path: str, split: str, files: list[str], table: pa.Table | None = None) -> PrefoptError:
    """The one-line error: the file and line of the first bad byte when a text file holds it, else the
    row and column of ``table`` (parquet, arrow, hub data)."""
    found = _first_bad_line(files)
    if found is not None:
        file, line, byte = found
        return PrefoptError(f"{file} line {line}: not UTF-8 text (byte 0x{byte:02x}); save the file as UTF-8")
    if table is not None:
        row, column = _first_bad_row(table)
        return PrefoptError(
            f"{path} (split {split}) row {row}, column {column!r}: not UTF-8 text; save the data as UTF-8"
        )
    return PrefoptError(f"{path}: not UTF-8 text; save the file as UTF-8")


def _first_bad_line(files: list[str]) -> tuple[str, int, int] | None:
    """(file, 1-based line, first bad byte) of the first line that is not UTF-8, in the order given."""
    for file in files:
        opener = _opener(file)
        if opener is None:
            continue
        with opener(file) as handle:
            for number, line in enumerate(handle, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return file, number, line[exc.start]
    return None


def _opener(file: str) -> Callable[[str], BinaryIO] | None:
    name, compression = os.path.splitext(file.lower())
    if compression not in OPENERS:  # no compression (".jsonl" is then the suffix) or one not in the stdlib
        name, compression = file.lower(), ""
    if not name.endswith(TEXT_SUFFIXES):
        return None
    return OPENERS[compression]


def _first_bad_row(table: pa.Table) -> tuple[int, str]:
    """(row, column) of the first string that is not UTF-8: the shortest invalid prefix of rows, by bisection."""
    good, bad = 0, table.num_rows  # rows [0, good) validate; rows [0, bad) do not
    while bad - good > 1:
        middle = (good + bad) // 2
        if _valid(table.slice(0, middle)):
            good = middle
        else:
            bad = middle
    row = bad - 1
    bad_columns = (name for name in table.column_names if not _valid(table.select([name]).slice(row, 1)))
    return row, next(bad_columns, "?")


def _valid(table: pa.Table) -> bool:
    try:
        table.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True
