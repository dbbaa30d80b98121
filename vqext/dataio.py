"""Reading series: CSV files (long, wide, M4, single column), bundled and synthetic series.

``load_panel`` returns every series a source holds; ``load_series`` returns one. Files are read
with pandas' pyarrow engine (multi-threaded, typed columns); a file pyarrow cannot parse (rows of
different widths) is read again with pandas' C engine as text, and every cell a typed read could
not convert goes through Python's ``float`` so that errors name the file, line and column.
The format and column rules are documented in docs/data.md; this module implements them.
"""
from __future__ import annotations

import codecs
import csv
import io
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from .errors import DataError

BUNDLED = {
    "airline": "airline.csv",  # monthly international airline passengers 1949-1960 (thousands)
    "nile": "nile.csv",        # annual Nile flow at Aswan 1871-1970 (10^8 m^3)
}
DEFAULT_DATA = "bundled:airline"
SYNTHETIC_DEFAULT_LENGTH = 400
FORMATS = ("auto", "long", "wide", "m4", "single")
FILLS = ("ffill", "interpolate", "zero", "drop")
# Squares of the values (variances, MSEs) must stay finite in float64.
MAX_ABS_VALUE = 1e150
# Files at least this big announce themselves on stderr while they load.
PROGRESS_BYTES = 50 * 2**20
# First header words that mark a column as the time / index column (``time(h)`` -> ``time``).
TIME_WORDS = frozenset({"ds", "t", "time", "date", "datetime", "timestamp", "index", "idx", "step",
                        "period", "year", "month", "week", "day", "hour", "minute"})
_M4_HEADER = re.compile(r"V\d+")
_DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+")


class DataWarning(UserWarning):
    """Data that loads but deserves a word: a guessed delimiter, a degenerate series."""


@dataclass(frozen=True)
class Series:
    values: np.ndarray  # float64, 1-D, finite
    name: str           # short label used in run directory names
    source: str         # what the user gave (path, bundled:NAME, synthetic:NAME)
    column: str         # the column name (or index) the values came from; the row id for M4
    uid: str = ""       # the series id (defaults to ``name``)
    ds: np.ndarray | None = field(default=None, repr=False)  # timestamps / index values, when the file has them

    def __post_init__(self):
        if not self.uid:
            object.__setattr__(self, "uid", self.name)

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Panel:
    """Every series of one source, in file order (long format: order of first appearance)."""
    series: tuple[Series, ...]
    source: str  # what the user gave
    name: str    # short label
    format: str  # "long" | "wide" | "m4" | "single"

    def __len__(self) -> int:
        return len(self.series)

    def __repr__(self) -> str:
        return f"Panel({len(self)} series, format={self.format!r}, source={self.source!r})"

    def __iter__(self) -> Iterator[Series]:
        return iter(self.series)

    def __getitem__(self, key: int | str) -> Series:
        """A series by position or by id."""
        if isinstance(key, str):
            for s in self.series:
                if s.uid == key:
                    return s
            raise KeyError(key)
        return self.series[key]

    @property
    def ids(self) -> list[str]:
        return [s.uid for s in self.series]

    def to_frame(self) -> pd.DataFrame:
        """Long format: ``unique_id, ds, y``; ``ds`` is the integer index 0..n-1 where a series has no timestamps."""
        ids = np.repeat(np.array(self.ids, dtype=object), [len(s) for s in self.series])
        if self.series and all(s.ds is not None for s in self.series):
            ds = np.concatenate([s.ds for s in self.series])
        else:
            ds = np.concatenate([np.arange(len(s)) for s in self.series]) if self.series else np.empty(0, np.int64)
        y = np.concatenate([s.values for s in self.series]) if self.series else np.empty(0)
        return pd.DataFrame({"unique_id": ids, "ds": ds, "y": y})

    @classmethod
    def from_frame(cls, df: pd.DataFrame, id_col: str = "unique_id", time_col: str | None = "ds",
                   value_col: str = "y", *, source: str = "<frame>", name: str = "frame",
                   fill: str | None = None) -> "Panel":
        """A panel from an in-memory long-format frame (same checks as a file; errors name the row)."""
        _check_fill(fill)
        cols = [str(c) for c in df.columns]
        frame = df.copy(deep=False)
        frame.columns = range(len(cols))
        where = _Where(source, None, header=False)
        return _long_panel(frame, cols, where, id_col, time_col, value_col, fill, source, name)


# --------------------------------------------------------------------------------------- entry
def load_panel(spec: str | None = None, *, format: str = "auto", id_col: str = "unique_id",
               time_col: str = "ds", value_col: str = "y", column: str | int | None = None,
               fill: str | None = None, sep: str | None = None, progress: bool | None = None,
               _one: bool = False) -> Panel:
    """Every series of a CSV path, ``bundled:NAME`` or ``synthetic:NAME[:LENGTH[:SEED]]``.

    ``format``: auto | long | wide | m4 | single. ``column`` picks one column (single format) or,
    for long / M4 files, one series id. ``fill``: None (gaps are errors), ffill, interpolate,
    zero or drop. ``sep``: the delimiter; None detects comma, tab or semicolon from the first line.
    ``progress``: a line on stderr before and after reading (None: only for files >= 50 MiB).
    """
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    _check_fill(fill)
    spec = DEFAULT_DATA if spec in (None, "") else str(spec)
    if spec.startswith("synthetic:"):
        s = synthetic_series(spec)
        return Panel((s,), spec, s.name, "single")
    if spec.startswith("bundled:") or (spec in BUNDLED and not os.path.exists(spec)):
        name = spec.split(":", 1)[1] if spec.startswith("bundled:") else spec
        if name not in BUNDLED:
            raise DataError(f"unknown bundled dataset {name!r}; choose one of {', '.join(sorted(BUNDLED))}")
        data = resources.files("vqext.datasets").joinpath(BUNDLED[name]).read_bytes()
        return _read_csv(data, f"bundled:{name}", name, format, id_col, time_col, value_col, column, fill, sep,
                         False, _one)
    if not os.path.exists(spec):
        raise DataError(f"data file not found: {spec} (give a CSV path, bundled:NAME or synthetic:NAME)")
    if os.path.isdir(spec):
        raise DataError(f"data path is a directory, not a CSV file: {spec}")
    return _read_csv(spec, spec, series_label(spec), format, id_col, time_col, value_col, column, fill, sep,
                     progress, _one)


def load_series(spec: str | None = None, column: str | int | None = None, fill: str | None = None,
                **options) -> Series:
    """One series: a CSV column (``column`` or the column rule's last value column), the series
    with id ``column`` of a long / M4 file, a bundled or a synthetic series."""
    panel = load_panel(spec, column=column, fill=fill, _one=True, **options)
    if len(panel) != 1:
        raise DataError(f"{panel.source} holds {len(panel)} series ({panel.format} format); "
                        f"pick one by id with --column (e.g. {panel.ids[0]!r}) or load it as a panel")
    return panel.series[0]


def series_label(path: str) -> str:
    """``../shared/data/y+w.csv`` -> ``y_w`` (the log's naming)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return _label(stem) or "data"


def _label(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(text)).strip("_")


def parse_csv_text(text: str, column: str | int | None = None, source: str = "<csv>",
                   fill: str | None = None) -> tuple[np.ndarray, str]:
    """The values of one column of CSV text and that column's label (single format)."""
    s = _read_csv(text.encode("utf-8"), source, "csv", "single", "unique_id", "ds", "y", column, fill,
                  None, False, True).series[0]
    return s.values, s.column


def _check_fill(fill):
    if fill is not None and fill not in FILLS:
        raise DataError(f"unknown fill {fill!r}; choose one of {', '.join(FILLS)} (or none: gaps are errors)")


# ------------------------------------------------------------------------------ reading a table
class _Where:
    """Turns a data-row position into a place a user can find: ``line 7`` of a file, ``row 7`` of a frame."""

    def __init__(self, source: str, raw: str | bytes | None, header: bool, sep: str = ","):
        self.source, self.raw, self.header, self.sep = source, raw, header, sep
        self._lines: list[int] | None = None

    def line(self, row: int) -> str:
        if self.raw is None:
            return f"row {row} (0-based)"
        if self._lines is None:
            self._lines = self._scan()
        if row < len(self._lines):
            return f"line {self._lines[row]}"
        return f"data row {row + 1}"

    def _scan(self) -> list[int]:
        """Physical line numbers of the data rows (empty lines skipped, quoted newlines counted):
        only run when an error is reported, so the reading itself never keeps line numbers."""
        try:
            if isinstance(self.raw, bytes):
                fh = io.StringIO(self.raw.decode("utf-8-sig", errors="replace"))
            else:
                fh = open(self.raw, encoding="utf-8-sig", errors="replace", newline="")
            with fh:
                lines, seen_header = [], not self.header
                reader = csv.reader(fh, delimiter=self.sep)
                start = 1
                for row in reader:
                    if row:  # only an empty line is skipped ('""' and spaces are rows)
                        if seen_header:
                            lines.append(start)
                        seen_header = True
                    start = reader.line_num + 1
                return lines
        except (csv.Error, OSError):
            return []


def _read_csv(src: str | bytes, source: str, name: str, fmt: str, id_col, time_col, value_col, column,
              fill, sep, progress, one: bool = False) -> Panel:
    size = len(src) if isinstance(src, bytes) else os.path.getsize(src)
    head = _head_text(src, source)
    sep, header, width = _sniff(head, sep, source, fmt)
    say = _progress(progress, size)
    say(f"vqext: reading {source} ({size / 2**20:.0f} MiB)")
    t0 = time.perf_counter()
    frame = _read_frame(src, source, sep, header is not None, width)
    cols = header if header is not None else [str(j) for j in range(frame.shape[1])]
    if len(cols) < frame.shape[1]:
        cols = cols + [str(j) for j in range(len(cols), frame.shape[1])]
    where = _Where(source, src, header is not None, sep)
    fmt = _detect_format(fmt, cols, frame, id_col, value_col, header is not None)
    if fmt == "columns" and one:
        fmt = "single"
    if fmt == "long":
        panel = _long_panel(frame, cols, where, id_col, time_col, value_col, fill, source, name, column)
    elif fmt == "m4":
        panel = _m4_panel(frame, cols, where, fill, source, name, column)
    else:
        panel = _columns_panel(frame, cols, where, fmt, time_col, column, fill, source, name)
    say(f"vqext: read {frame.shape[0]:,} rows, {len(panel)} series from {source} "
        f"in {time.perf_counter() - t0:.1f} s")
    return panel


def _progress(progress: bool | None, size: int) -> Callable[[str], None]:
    if progress or (progress is None and size >= PROGRESS_BYTES):
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return lambda msg: None


def _head_text(src: str | bytes, source: str) -> str:
    """The first 64 KiB as text, cut at the last whole line; errors for binary or non-UTF-8 data."""
    if isinstance(src, bytes):
        raw = src[:65536]
    else:
        try:
            with open(src, "rb") as fh:
                raw = fh.read(65536)
        except OSError as exc:
            raise DataError(f"cannot read {source}: {exc.strerror}") from None
    if b"\x00" in raw:
        raise DataError(f"{source} is not a text CSV file (it contains NUL bytes)")
    try:  # an incremental decoder: a character cut at the 64 KiB boundary is not an error
        return codecs.getincrementaldecoder("utf-8-sig")().decode(raw, final=len(raw) < 65536)
    except UnicodeDecodeError as exc:
        raise DataError(f"{source} is not a UTF-8 text CSV file ({exc.reason} at byte {exc.start})") from None


def _sniff(head: str, sep: str | None, source: str, fmt: str = "auto") -> tuple[str, list[str] | None, int]:
    """The delimiter, the header cells and the width. The first row is a header when one of its
    cells is not a number (for M4: one of the cells after the id), else None."""
    first = next((ln for ln in head.splitlines() if ln.strip()), None)
    if first is None:
        raise DataError(f"{source}: the file is empty")
    if sep is None:
        sep = ","
        if "," not in first:
            for cand, word in (("\t", "tab"), (";", "semicolon")):
                if cand in first:
                    sep = cand
                    warnings.warn(f"{source}: the first line has no comma but {first.count(cand)} {word}s; "
                                  f"reading it as {word}-separated", DataWarning, stacklevel=4)
                    break
    elif len(sep) != 1:
        raise DataError(f"the delimiter must be one character, got {sep!r}")
    try:
        cells = next(csv.reader([first], delimiter=sep))
    except (csv.Error, StopIteration) as exc:
        raise DataError(f"{source}: not a readable CSV file ({exc})") from None
    looked_at = [c for c in cells[1:] if c.strip()] if fmt == "m4" else cells
    if any(_to_float(c.strip()) is None for c in looked_at):
        return sep, [c.strip() for c in cells], len(cells)
    return sep, None, len(cells)


def _read_frame(src: str | bytes, source: str, sep: str, header: bool, width: int) -> pd.DataFrame:
    """The table with positional integer column labels: typed arrow columns, or, when pyarrow
    cannot parse the file (rows of different widths), all-text columns from the C engine."""
    opts = dict(sep=sep, header=0 if header else None, keep_default_na=False, na_values=[""])
    buf = (lambda: io.BytesIO(src)) if isinstance(src, bytes) else (lambda: src)
    try:
        df = _read_arrow(buf(), sep, header)
    except (UnicodeDecodeError, pd.errors.ParserError, ValueError, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, UnicodeError) and "CSV" not in str(exc):
            raise DataError(f"cannot read {source}: {getattr(exc, 'strerror', None) or exc}") from None
        if "UTF8" in str(exc) or isinstance(exc, UnicodeDecodeError):
            raise DataError(f"{source} is not a UTF-8 text CSV file ({_one_line(exc)})") from None
        df = _read_text_frame(buf(), source, opts, width)
    if df.shape[0] == 0:
        raise DataError(f"{source}: only a header row, no data" if header else f"{source}: the file is empty")
    df.columns = range(df.shape[1])
    return df


#: Bytes of CSV text pyarrow parses at a time: the peak memory of a read is a few blocks above the
#: table (pandas' pyarrow engine reads the whole file in parallel, about 2.5x its size at the peak).
ARROW_BLOCK_BYTES = 8 << 20


def _read_arrow(src, sep: str, header: bool) -> pd.DataFrame:
    """Typed, arrow-backed columns, streamed block by block. Column types are inferred from the
    first block; a later cell that does not fit raises, and the caller reads the file as text."""
    import pyarrow.csv as pacsv

    reader = pacsv.open_csv(
        src, read_options=pacsv.ReadOptions(block_size=ARROW_BLOCK_BYTES, autogenerate_column_names=not header),
        parse_options=pacsv.ParseOptions(delimiter=sep),
        convert_options=pacsv.ConvertOptions(null_values=[""], strings_can_be_null=True))
    return reader.read_all().to_pandas(types_mapper=pd.ArrowDtype)


def _read_text_frame(buf, source: str, opts: dict, width: int) -> pd.DataFrame:
    # Explicit names and no header: a row wider than the first is an error (a header row would
    # otherwise make pandas take the extra field for an index); the header row is dropped after.
    header = opts["header"] == 0
    text_opts = dict(opts, header=None, names=list(range(width)))
    try:
        df = pd.read_csv(buf, engine="c", dtype=str, encoding="utf-8-sig", **text_opts)
    except pd.errors.ParserError as exc:
        raise DataError(f"{source}: not a readable CSV file ({_one_line(exc).replace('Error tokenizing data. C error: ', '')})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{source} is not a UTF-8 text CSV file ({exc.reason} at byte {exc.start})") from None
    except (ValueError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{source}: not a readable CSV file ({_one_line(exc)})") from None
    return df.iloc[1:].reset_index(drop=True) if header else df


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _to_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


# --------------------------------------------------------------------------------- format rules
def _detect_format(fmt: str, cols: list[str], frame: pd.DataFrame, id_col: str, value_col: str,
                   has_header: bool) -> str:
    """long: the header names ``id_col``; m4: the header is V1..Vk (the M4 files' own);
    otherwise wide when several value columns remain, single when one does."""
    if fmt != "auto":
        return fmt
    if has_header and id_col in cols:
        return "long"
    if has_header and len(cols) >= 2 and all(_M4_HEADER.fullmatch(c) for c in cols) and not _is_numeric(frame[0]):
        return "m4"
    return "columns"


def _is_numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype)


def _is_time_header(name: str) -> bool:
    words = re.findall(r"[a-z0-9]+", name.lower())
    return bool(words) and words[0] in TIME_WORDS


def _find(cols: list[str], name: str, what: str, source: str) -> int:
    hits = [j for j, c in enumerate(cols) if c == name]
    if len(hits) > 1:
        raise DataError(f"{source}: ambiguous {what} {name!r}: the header has it {len(hits)} times "
                        f"(columns {', '.join(str(j) for j in hits)}); rename one or pick it by index")
    if not hits:
        raise DataError(f"{source}: no {what} {name!r}; available: {', '.join(repr(c) for c in cols)}")
    return hits[0]


# ------------------------------------------------------------------------------ cell conversion
def _numeric(col: pd.Series, label: str, where: _Where) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, gap mask): empty cells are gaps (NaN in the values); any other cell that is
    not a finite number within +-MAX_ABS_VALUE is an error naming the line and column."""
    src = where.source
    arrow = _arrow(col)
    if _is_numeric(col) and arrow is not None:  # typed read: arrow's buffers, no per-cell work
        gaps = arrow.is_null().to_numpy(zero_copy_only=False) if arrow.null_count else np.zeros(len(arrow), bool)
        values = np.asarray(arrow.to_numpy(), dtype=np.float64)
        if arrow.null_count:
            values = np.where(gaps, np.nan, values)
    elif _is_numeric(col):
        gaps = col.isna().to_numpy(dtype=bool)
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
    elif pd.api.types.is_string_dtype(col.dtype) or col.dtype == object or "null" in str(col.dtype):
        values, gaps = _numeric_text(col, label, where)
    else:  # a typed read that is not numbers (booleans, dates): report the first cell
        gaps = col.isna().to_numpy(dtype=bool)
        first = int(np.argmin(gaps)) if not gaps.all() else 0
        raise DataError(f"{src}: {where.line(first)}, column {label!r}: {str(col.iloc[first])[:40]!r} is not a number")
    bad = ~gaps & ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{src}: {where.line(i)}, column {label!r}: {values[i]} (NaN/inf values are not allowed)")
    big = ~gaps & (np.abs(np.where(gaps, 0.0, values)) > MAX_ABS_VALUE)
    if big.any():
        i = int(np.argmax(big))
        raise DataError(f"{src}: {where.line(i)}, column {label!r}: {values[i]:g} is too large (squared errors would "
                        f"overflow; values must be within +-{MAX_ABS_VALUE:g}, rescale the column)")
    return values, gaps


def _numeric_text(col: pd.Series, label: str, where: _Where) -> tuple[np.ndarray, np.ndarray]:
    """Python's float for every cell: the exact reference reading (any Unicode digits, spaces)."""
    cells = col.to_numpy(dtype=object, na_value=None)
    values = np.empty(len(cells), dtype=np.float64)
    gaps = np.zeros(len(cells), dtype=bool)
    for i, cell in enumerate(cells):
        text = "" if cell is None else str(cell).strip()
        if not text:
            gaps[i], values[i] = True, np.nan
            continue
        v = _to_float(text)
        if v is None:
            hint = " (a decimal comma? use '.' as the decimal point)" if _DECIMAL_COMMA.fullmatch(text) else ""
            raise DataError(f"{where.source}: {where.line(i)}, column {label!r}: {text[:40]!r} is not a number{hint}")
        values[i] = v
    return values, gaps


def _is_text_column(col: pd.Series) -> bool:
    """True when no cell of the column is a number (labels, ids, dates): such a column never holds a series."""
    if _is_numeric(col) or "null" in str(col.dtype):
        return False  # numbers, or an empty column (reported as such when chosen)
    if not (pd.api.types.is_string_dtype(col.dtype) or col.dtype == object):
        return True  # booleans, timestamps
    cells = col.dropna()
    return len(cells) > 0 and not any(_to_float(str(c).strip()) is not None for c in cells)


def _arrow(col: pd.Series):
    """The pyarrow ChunkedArray behind an arrow-backed column, else None."""
    return col.array.__arrow_array__() if isinstance(col.dtype, pd.ArrowDtype) else None


def _factorize(col: pd.Series) -> tuple[np.ndarray, list[str]]:
    """(a code per row, the ids in order of first appearance). An arrow column is encoded by
    arrow: pandas would first turn every cell into a Python string, several times the file's size
    for millions of rows."""
    arrow = _arrow(col)
    if arrow is not None:
        encoded = arrow.combine_chunks().dictionary_encode()
        return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), \
            [str(u) for u in encoded.dictionary.to_pylist()]
    codes, uniques = pd.factorize(col, sort=False)
    return np.asarray(codes), [str(u) for u in uniques]


def _time_values(col: pd.Series) -> np.ndarray:
    """Timestamps as datetime64, numbers as numbers, anything else as the text it is."""
    arrow = _arrow(col)
    if arrow is not None and "timestamp" in str(arrow.type) and not arrow.null_count and arrow.type.tz is None:
        return arrow.to_numpy()  # datetime64 in the file's unit, zero-copy for one chunk
    if pd.api.types.is_datetime64_any_dtype(col.dtype) or "timestamp" in str(col.dtype):
        return col.to_numpy(dtype="datetime64[ns]", na_value=np.datetime64("NaT"))
    if _is_numeric(col):
        if pd.api.types.is_integer_dtype(col.dtype) and not col.isna().any():
            return col.to_numpy(dtype=np.int64)
        return col.to_numpy(dtype=np.float64, na_value=np.nan)
    text = col.to_numpy(dtype=object, na_value=None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = pd.to_datetime(pd.Series(text), format="ISO8601")
        return parsed.to_numpy(dtype="datetime64[ns]")
    except (ValueError, TypeError, OverflowError):
        return text


# ---------------------------------------------------------------------------------------- gaps
def _fill_gaps(values: np.ndarray, gaps: np.ndarray, fill: str | None, label: str, where: _Where,
               rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(filled values, kept positions or None when all are kept). ``rows`` maps positions to data rows."""
    if not gaps.any():
        return values, None
    if gaps.all():
        raise DataError(f"{where.source}: column {label!r} has no values")
    if fill is None:
        i = int(np.argmax(gaps))
        row = int(rows[i]) if rows is not None else i
        raise DataError(f"{where.source}: {where.line(row)} has no value in column {label!r} "
                        f"(a gap; pass --fill ffill|interpolate|zero|drop to fill gaps)")
    if fill == "drop":
        keep = np.flatnonzero(~gaps)
        return values[keep], keep
    if fill == "zero":
        return np.where(gaps, 0.0, values), None
    known = np.flatnonzero(~gaps)
    if fill == "interpolate":  # linear in position; gaps at either end take the nearest value
        return np.interp(np.arange(len(values)), known, values[known]), None
    # ffill: the last value before each gap; gaps at the start take the first value
    last = np.maximum.accumulate(np.where(gaps, -1, np.arange(len(values))))
    last = np.where(last < 0, known[0], last)
    return values[last], None


def _trim_padding(gaps: np.ndarray, leading: bool) -> tuple[int, int]:
    """The [start, stop) of a series inside its padded row / column: trailing empty cells (and,
    for wide files, leading ones) are padding, not gaps."""
    present = np.flatnonzero(~gaps)
    if len(present) == 0:
        return 0, 0
    return (int(present[0]) if leading else 0), int(present[-1]) + 1


# -------------------------------------------------------------------------------------- formats
def _columns_panel(frame, cols, where, fmt, time_col, column, fill, source, name) -> Panel:
    """Single-column and wide files. The column rule: an explicit ``column`` (header name, or
    0-based index) is the one series; otherwise the first column is the time/index column when
    its header is ``time_col`` or a time word (time, date, ...) or when no cell of it is a number,
    text-only columns are skipped, and every remaining column is a series (wide) or, for a
    single-series read, the last one is."""
    width = frame.shape[1]
    index_col = None
    if width >= 2 and (cols[0] == time_col or _is_time_header(cols[0]) or _is_text_column(frame[0])):
        index_col = 0
    if column is not None and column != "":
        j = _pick_column(column, cols, width, where.header, source)
        value_cols = [j]
        if index_col == j:
            index_col = None
    else:
        value_cols = [j for j in range(width) if j != index_col and not _is_text_column(frame[j])]
        if not value_cols:
            _no_value_column(frame, cols, where, index_col)
        if fmt == "single":
            value_cols = value_cols[-1:]
    one = len(value_cols) == 1 and fmt != "wide"
    ds_all = _time_values(frame[index_col]) if index_col is not None else None
    series = []
    for j in value_cols:
        label = cols[j] if where.header else str(j)
        values, gaps = _numeric(frame[j], label, where)
        start, stop = (0, len(values)) if one else _trim_padding(gaps, leading=True)
        if stop == 0:
            raise DataError(f"{source}: column {label!r} has no values")
        values, gaps = values[start:stop], gaps[start:stop]
        rows = np.arange(start, stop)
        values, keep = _fill_gaps(values, gaps, fill, label, where, rows)
        ds = None if ds_all is None else ds_all[start:stop] if keep is None else ds_all[start:stop][keep]
        sname = name if one else (_label(label) or f"col{j}")
        uid = sname if one else label
        series.append(Series(values, sname, source, label, uid, ds))
    return Panel(tuple(series), source, name, "single" if one else "wide")


def _no_value_column(frame, cols, where, index_col) -> None:
    """Raise for a file without a value column, showing why its last column is not one."""
    j = frame.shape[1] - 1 if index_col != frame.shape[1] - 1 else 0
    label = cols[j] if where.header else str(j)
    try:
        _numeric(frame[j], label, where)
        why = ""
    except DataError as exc:
        why = f" (last column: {str(exc).removeprefix(where.source + ': ')})"
    raise DataError(f"{where.source}: no column holds numbers{why}; pick one with --column")


def _pick_column(column, cols, width, header, source) -> int:
    if header and str(column) in cols:
        return _find(cols, str(column), "column", source)
    try:
        j = int(column)
    except (TypeError, ValueError):
        known = ", ".join(repr(h) for h in cols) if header else f"indices 0..{width - 1}"
        raise DataError(f"{source}: no column {column!r}; available: {known}") from None
    if not -width <= j < width:
        raise DataError(f"{source}: column index {j} out of range (the file has {width} columns)")
    return j % width


def _numeric_block(frame, cols, where) -> tuple[np.ndarray, np.ndarray]:
    """(values, gaps) of columns 1.. as (rows, columns) arrays. Typed numeric columns are converted
    from arrow's buffers in one pass (an M4 file has up to ~2,600 columns, and a per-column pandas
    round trip costs ~1 ms each); a column with a problem goes through ``_numeric`` for its error."""
    label = (lambda j: cols[j] if where.header else str(j))
    width = frame.shape[1]
    values = np.empty((frame.shape[0], width - 1), dtype=np.float64)
    gaps = np.zeros((frame.shape[0], width - 1), dtype=bool)
    for j, col in frame.items():  # items() hands out the columns without per-column lookups
        if j == 0:
            continue
        arrow = _arrow(col)
        if arrow is None or not (pa.types.is_integer(arrow.type) or pa.types.is_floating(arrow.type)
                                 or pa.types.is_null(arrow.type)):
            values[:, j - 1], gaps[:, j - 1] = _numeric(col, label(j), where)
            continue
        if arrow.null_count:
            gaps[:, j - 1] = arrow.is_null().to_numpy(zero_copy_only=False)
            values[:, j - 1] = arrow.to_numpy(zero_copy_only=False) if not pa.types.is_null(arrow.type) else np.nan
        else:
            values[:, j - 1] = arrow.to_numpy()
    bad = ~gaps & ~(np.abs(np.where(gaps, 0.0, values)) <= MAX_ABS_VALUE)  # NaN, inf, too large
    if bad.any():
        j = int(np.argmax(bad.any(axis=0))) + 1
        _numeric(frame[j], label(j), where)  # raises the error for that column
    return values, gaps


def _m4_panel(frame, cols, where, fill, source, name, column) -> Panel:
    """One series a row: the id, then the values; trailing empty cells are padding."""
    if frame.shape[1] < 2:
        raise DataError(f"{source}: M4 format needs an id column and at least one value column")
    ids = [str(x) for x in frame[0].to_numpy(dtype=object, na_value="")]
    if column is not None:
        if str(column) not in ids:
            raise DataError(f"{source}: no series {str(column)!r}; ids: {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}")
        pick = [ids.index(str(column))]
    else:
        pick = range(len(ids))
    values, gaps = _numeric_block(frame, cols, where)
    seen: set[str] = set()
    series = []
    for r in pick:
        uid = ids[r]
        if not uid:
            raise DataError(f"{source}: {where.line(r)} has no series id in column {cols[0]!r}")
        if uid in seen:
            raise DataError(f"{source}: {where.line(r)}: series id {uid!r} appears twice")
        seen.add(uid)
        _, stop = _trim_padding(gaps[r], leading=False)
        if stop == 0:
            raise DataError(f"{source}: {where.line(r)}: series {uid!r} has no values")
        g = gaps[r, :stop]
        if g.any() and fill is None:
            k = int(np.argmax(g))
            raise DataError(f"{source}: {where.line(r)} has no value in column {cols[k + 1]!r} "
                            f"(a gap inside series {uid!r}; pass --fill ffill|interpolate|zero|drop to fill gaps)")
        v, _ = _fill_gaps(values[r, :stop], g, fill, uid, where)
        series.append(Series(v, _label(uid) or f"row{r}", source, uid, uid, None))
    return Panel(tuple(series), source, name, "m4")


def _long_panel(frame, cols, where, id_col, time_col, value_col, fill, source, name, column=None) -> Panel:
    """``unique_id, ds, y`` rows in any order: grouped by id (order of first appearance), sorted
    by time within each series when the time column holds timestamps or numbers."""
    jid = _find(cols, id_col, "id column", source)
    jy = _find(cols, value_col, "value column", source)
    jt = _find(cols, time_col, "time column", source) if time_col and time_col in cols else None
    ids = frame[jid]
    if ids.isna().any():
        r = int(np.argmax(ids.isna().to_numpy(dtype=bool)))
        raise DataError(f"{source}: {where.line(r)} has no series id in column {id_col!r}")
    codes, uniques = _factorize(ids)
    values, gaps = _numeric(frame[jy], value_col, where)
    ds = _time_values(frame[jt]) if jt is not None else None
    sortable = ds is not None and ds.dtype != object
    if sortable:
        if np.issubdtype(ds.dtype, np.datetime64) and np.isnat(ds).any():
            r = int(np.argmax(np.isnat(ds)))
            raise DataError(f"{source}: {where.line(r)} has no time in column {time_col!r}")
        if np.issubdtype(ds.dtype, np.floating) and np.isnan(ds).any():
            r = int(np.argmax(np.isnan(ds)))
            raise DataError(f"{source}: {where.line(r)} has no time in column {time_col!r}")
    codes = np.asarray(codes)
    grouped = bool(np.all(codes[1:] >= codes[:-1])) if len(codes) > 1 else True
    if sortable:
        in_order = grouped and _sorted_within(codes, ds)
        order = None if in_order else np.lexsort((ds, codes))
    else:
        order = None if grouped else np.argsort(codes, kind="stable")
    if order is not None:
        codes, values, gaps = codes[order], values[order], gaps[order]
        ds = ds[order] if ds is not None else None
    bounds = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [len(codes)]])
    wanted = range(len(uniques))
    if column is not None:
        if str(column) not in uniques:
            raise DataError(f"{source}: no series {str(column)!r} in column {id_col!r}")
        wanted = [uniques.index(str(column))]
    series = []
    for k in wanted:
        a, b = int(starts[k]), int(stops[k])
        rows = order[a:b] if order is not None else np.arange(a, b)
        d = ds[a:b] if ds is not None else None
        if sortable and len(d) > 1 and (dup := np.flatnonzero(d[1:] == d[:-1])).size:
            r1, r2 = sorted((int(rows[dup[0]]), int(rows[dup[0] + 1])))
            raise DataError(f"{source}: {where.line(r1)} and {where.line(r2)}: series {uniques[k]!r} has "
                            f"time {d[dup[0]]} twice in column {time_col!r}")
        v, keep = _fill_gaps(values[a:b], gaps[a:b], fill, value_col, where, rows)
        if keep is not None and d is not None:
            d = d[keep]
        series.append(Series(np.ascontiguousarray(v), _label(uniques[k]) or f"series{k}", source, value_col,
                             uniques[k], None if d is None else np.ascontiguousarray(d)))
    return Panel(tuple(series), source, name, "long")


def _sorted_within(codes: np.ndarray, ds: np.ndarray) -> bool:
    """Whether ``ds`` is non-decreasing inside each run of equal ``codes`` (codes already grouped)."""
    if len(ds) < 2:
        return True
    same = codes[1:] == codes[:-1]
    return bool(np.all((ds[1:] >= ds[:-1]) | ~same))


# ------------------------------------------------------------------------------------ synthetic
def _synthetic_values(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=np.float64)
    if kind == "sine":
        return np.sin(2 * np.pi * t / 25.0) + 0.05 * rng.standard_normal(n)
    if kind == "trend":  # trend + season + noise
        return 0.02 * t + np.sin(2 * np.pi * t / 20.0) + 0.2 * rng.standard_normal(n)
    if kind == "random-walk":
        return np.cumsum(rng.standard_normal(n))
    if kind == "constant":  # degenerate on purpose: zero variance (tests the normaliser guard)
        return np.full(n, 3.0)
    raise DataError(f"unknown synthetic series {kind!r}; choose one of {', '.join(SYNTHETIC_KINDS)}")


SYNTHETIC_KINDS = ("sine", "trend", "random-walk", "constant")


def synthetic_series(spec: str) -> Series:
    parts = spec.split(":")
    kind = parts[1] if len(parts) > 1 else ""
    try:
        n = int(parts[2]) if len(parts) > 2 else SYNTHETIC_DEFAULT_LENGTH
        seed = int(parts[3]) if len(parts) > 3 else 0
    except ValueError:
        raise DataError(f"bad synthetic spec {spec!r}; use synthetic:NAME[:LENGTH[:SEED]]") from None
    if n < 1:
        raise DataError(f"synthetic length must be positive, got {n}")
    return Series(_synthetic_values(kind, n, seed), f"syn_{kind.replace('-', '_')}", spec, "value")
