"""CSV formats (long, wide, M4, single column), the column rule, gaps and fills, and every error
message naming the file, line and column."""
import csv
import os
import warnings

import numpy as np
import pandas as pd
import pytest

from vqext.data import DataWarning, Panel, load_panel, load_series, parse_csv_text
from vqext.errors import DataError

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")
SHARED = SHARED if os.path.isdir(SHARED) else "/work/shared/data"


def write(tmp_path, text, name="f.csv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


# ------------------------------------------------------------------------------------ long format
def test_long_format_groups_by_id_sorts_by_time_and_keeps_lengths(tmp_path):
    p = write(tmp_path, "unique_id,ds,y\n"
                        "b,2024-01-02,20\n"
                        "a,2024-01-01,1\n"
                        "b,2024-01-01,10\n"
                        "a,2024-01-02,2\n"
                        "a,2024-01-03,3\n")
    panel = load_panel(p)
    assert isinstance(panel, Panel) and panel.format == "long" and len(panel) == 2
    assert panel.ids == ["b", "a"]  # order of first appearance
    b, a = panel
    assert b.values.tolist() == [10, 20] and a.values.tolist() == [1, 2, 3]
    assert a.ds.dtype.kind == "M" and str(a.ds[0])[:10] == "2024-01-01"
    assert a.uid == "a" and a.column == "y" and a.source == p
    assert panel["a"] is a and panel[0] is b
    frame = panel.to_frame()
    assert list(frame.columns) == ["unique_id", "ds", "y"] and len(frame) == 5
    assert frame["y"].tolist() == [10, 20, 1, 2, 3]


def test_long_format_column_names_are_options(tmp_path):
    p = write(tmp_path, "store;when;sales\nx;1;5\nx;2;6\ny;1;7\n")
    with pytest.warns(DataWarning, match="semicolon"):
        panel = load_panel(p, id_col="store", time_col="when", value_col="sales")
    assert panel.format == "long" and panel.ids == ["x", "y"]
    assert panel["x"].values.tolist() == [5, 6] and panel["x"].ds.tolist() == [1, 2]
    with pytest.raises(DataError, match="no value column 'y'; available: 'store', 'when', 'sales'"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_panel(p, format="long", id_col="store")


def test_long_format_without_time_column_keeps_file_order(tmp_path):
    p = write(tmp_path, "unique_id,y\na,3\nb,1\na,2\n")
    panel = load_panel(p)
    assert panel["a"].values.tolist() == [3, 2] and panel["a"].ds is None
    assert panel.to_frame()["ds"].tolist() == [0, 1, 0]


def test_long_format_errors_name_line_and_column(tmp_path):
    p = write(tmp_path, "unique_id,ds,y\na,1,1\na,2,\na,3,3\n")
    with pytest.raises(DataError, match=r"f\.csv: line 3 has no value in column 'y' \(a gap; pass --fill"):
        load_panel(p)
    p = write(tmp_path, "unique_id,ds,y\na,1,1\nb,1,5\na,1,2\n")
    with pytest.raises(DataError, match=r"line 2 and line 4: series 'a' has time 1 twice in column 'ds'"):
        load_panel(p)
    p = write(tmp_path, "unique_id,ds,y\na,1,1\n,2,5\n")
    with pytest.raises(DataError, match=r"line 3 has no series id in column 'unique_id'"):
        load_panel(p)
    p = write(tmp_path, "unique_id,ds,y\na,1,1\na,2,oops\n")
    with pytest.raises(DataError, match=r"line 3, column 'y': 'oops' is not a number"):
        load_panel(p)


def test_long_format_gap_is_found_after_sorting_and_filled(tmp_path):
    # Rows out of time order: the gap is reported at its own line, and fills follow time order.
    p = write(tmp_path, "unique_id,ds,y\na,3,30\na,1,10\na,2,\n")
    with pytest.raises(DataError, match="line 4 has no value in column 'y'"):
        load_panel(p)
    assert load_panel(p, fill="ffill")["a"].values.tolist() == [10, 10, 30]
    assert load_panel(p, fill="interpolate")["a"].values.tolist() == [10, 20, 30]
    assert load_panel(p, fill="zero")["a"].values.tolist() == [10, 0, 30]
    dropped = load_panel(p, fill="drop")["a"]
    assert dropped.values.tolist() == [10, 30] and dropped.ds.tolist() == [1, 3]


def test_long_file_gives_one_series_by_id(tmp_path):
    p = write(tmp_path, "unique_id,ds,y\na,1,1\na,2,2\nb,1,5\n")
    assert load_series(p, "b").values.tolist() == [5]
    with pytest.raises(DataError, match="holds 2 series \\(long format\\); pick one by id with --column"):
        load_series(p)
    with pytest.raises(DataError, match="no series 'c' in column 'unique_id'"):
        load_series(p, "c")


def test_panel_from_frame_checks_like_a_file():
    df = pd.DataFrame({"unique_id": ["a", "a", "b"], "ds": [1, 2, 1], "y": [1.0, 2.0, 3.0]})
    panel = Panel.from_frame(df, source="mem", name="m")
    assert panel.ids == ["a", "b"] and panel["a"].values.tolist() == [1, 2] and panel.name == "m"
    assert Panel.from_frame(panel.to_frame()).to_frame().equals(panel.to_frame())
    bad = pd.DataFrame({"unique_id": ["a", "a"], "ds": [1, 2], "y": [1.0, np.nan]})
    with pytest.raises(DataError, match="mem: row 1 \\(0-based\\) has no value in column 'y'"):
        Panel.from_frame(bad, source="mem")
    assert Panel.from_frame(bad, fill="ffill")["a"].values.tolist() == [1, 1]


# ------------------------------------------------------------------------------------ wide format
def test_wide_format_one_series_a_column_with_different_lengths(tmp_path):
    p = write(tmp_path, "date,a,b,c\n"
                        "2024-01-01,1,,7\n"
                        "2024-01-02,2,5,8\n"
                        "2024-01-03,3,6,\n"
                        "2024-01-04,4,,\n")
    panel = load_panel(p)
    assert panel.format == "wide" and panel.ids == ["a", "b", "c"]
    a, b, c = panel
    assert a.values.tolist() == [1, 2, 3, 4] and b.values.tolist() == [5, 6] and c.values.tolist() == [7, 8]
    assert str(b.ds[0])[:10] == "2024-01-02" and len(b.ds) == 2  # leading padding: the series starts later
    with pytest.raises(DataError, match="line 4 has no value in column 'c'"):
        load_series(p)  # one column: every row must hold a value


def test_wide_format_interior_gap_is_an_error_unless_filled(tmp_path):
    p = write(tmp_path, "t,a,b\n0,1,1\n1,2,\n2,3,3\n")
    with pytest.raises(DataError, match=r"f\.csv: line 3 has no value in column 'b'"):
        load_panel(p)
    assert load_panel(p, fill="interpolate")["b"].values.tolist() == [1, 2, 3]
    dropped = load_panel(p, fill="drop")["b"]
    assert dropped.values.tolist() == [1, 3] and dropped.ds.tolist() == [0, 2]


def test_wide_format_without_an_index_column(tmp_path):
    p = write(tmp_path, "x,y\n1,10\n2,20\n3,\n")
    panel = load_panel(p)
    assert panel.format == "wide" and panel.ids == ["x", "y"] and panel["y"].values.tolist() == [10, 20]
    assert panel["x"].ds is None
    assert load_panel(p, format="single", column="x").format == "single"


# -------------------------------------------------------------------------------------- M4 format
def test_m4_format_rows_with_trailing_padding(tmp_path):
    p = write(tmp_path, '"V1","V2","V3","V4","V5"\n'
                        '"H1","1","2","3","4"\n'
                        '"H2","5","6","",""\n')
    panel = load_panel(p)
    assert panel.format == "m4" and panel.ids == ["H1", "H2"]
    assert panel["H1"].values.tolist() == [1, 2, 3, 4] and panel["H2"].values.tolist() == [5, 6]
    assert panel["H2"].ds is None and load_series(p, "H2").values.tolist() == [5, 6]
    gap = write(tmp_path, '"V1","V2","V3","V4"\n"H1","1","","3"\n', "gap.csv")
    with pytest.raises(DataError, match=r"gap\.csv: line 2 has no value in column 'V3' \(a gap inside series 'H1'"):
        load_panel(gap)
    assert load_panel(gap, fill="interpolate")["H1"].values.tolist() == [1, 2, 3]
    dup = write(tmp_path, '"V1","V2"\n"H1","1"\n"H1","2"\n', "dup.csv")
    with pytest.raises(DataError, match="line 3: series id 'H1' appears twice"):
        load_panel(dup)


def test_m4_format_without_header_needs_the_option(tmp_path):
    p = write(tmp_path, "W1,1,2,3\nW2,4,5,\n")
    panel = load_panel(p, format="m4")
    assert panel.ids == ["W1", "W2"] and panel["W2"].values.tolist() == [4, 5]


def test_m4_hourly_training_file():
    path = os.path.join(SHARED, "m4", "Hourly-train.csv")
    if not os.path.exists(path):
        pytest.skip("M4 data not present")
    panel = load_panel(path)
    lengths = [len(s) for s in panel]
    assert panel.format == "m4" and len(panel) == 414 and panel.ids[:2] == ["H1", "H2"]
    assert min(lengths) == 700 and max(lengths) == 960
    assert panel["H1"].values[:3].tolist() == [605, 586, 586]
    assert all(np.isfinite(s.values).all() for s in panel)


# -------------------------------------------------------------------------- single column (seed)
def _old_reader(path):
    """The loader's previous rule for these files: the last column, Python's float per cell."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    return rows[0][-1], np.array([float(r[-1]) for r in rows[1:]], dtype=np.float64)


@pytest.mark.parametrize("name", ["y+w.csv", "w+y.csv"])
def test_seed_series_are_bit_for_bit_the_old_reading(name):
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip("seed data not present")
    column, old = _old_reader(path)
    s = load_series(path)
    assert s.column == column == "formaldehyde(ug/m³)" and s.name == name.replace("+", "_")[:-4]
    assert s.values.dtype == np.float64 and np.array_equal(s.values, old)
    assert s.values.tobytes() == old.tobytes()
    assert s.ds is not None and s.ds[1] == pytest.approx(1 / 30)
    panel = load_panel(path)
    assert panel.format == "single" and len(panel) == 1 and np.array_equal(panel.series[0].values, old)


def test_bundled_and_synthetic_are_panels_of_one():
    air = load_panel("bundled:airline")
    assert air.format == "single" and len(air) == 1 and air.series[0].values.sum() == 40363
    assert str(air.series[0].ds[0])[:7] == "1949-01"
    syn = load_panel("synthetic:sine:30")
    assert len(syn) == 1 and np.array_equal(syn.series[0].values, load_series("synthetic:sine:30").values)


# ------------------------------------------------------------------------------ the column rule
def test_an_empty_cell_never_moves_the_default_column(tmp_path):
    # The old rule ("the last all-numeric column") took column 't' here without a word.
    p = write(tmp_path, "t,v\n1,2\n2,\n3,4\n")
    with pytest.raises(DataError, match=r"f\.csv: line 3 has no value in column 'v'"):
        load_series(p)
    assert load_series(p, fill="ffill").values.tolist() == [2, 2, 4]
    p = write(tmp_path, "a,b\n1,2\n2,\n3,4\n")
    with pytest.raises(DataError, match="line 3 has no value in column 'b'"):
        load_series(p)


def test_a_stray_word_in_the_value_column_is_an_error_not_a_fallback(tmp_path):
    p = write(tmp_path, "t,v\n1,2\n2,n/a\n3,4\n")
    with pytest.raises(DataError, match=r"line 3, column 'v': 'n/a' is not a number"):
        load_series(p)


def test_text_columns_and_time_columns_are_not_series(tmp_path):
    p = write(tmp_path, "time(h),temp,label\n0,1.5,a\n1,2.5,b\n")
    panel = load_panel(p)
    assert panel.format == "single" and panel.series[0].column == "temp"
    assert panel.series[0].ds.tolist() == [0, 1]


def test_duplicated_header_names_are_ambiguous(tmp_path):
    p = write(tmp_path, "t,x,x\n1,2,3\n2,4,5\n")
    with pytest.raises(DataError, match=r"ambiguous column 'x': the header has it 2 times \(columns 1, 2\)"):
        load_series(p, "x")
    assert load_series(p, 2).values.tolist() == [3, 5]  # by index it is not ambiguous


@pytest.mark.parametrize("sep,word", [(";", "semicolon"), ("\t", "tab")])
def test_semicolon_and_tab_files_are_detected_and_announced(tmp_path, sep, word):
    p = write(tmp_path, f"t{sep}v\n1{sep}2.5\n2{sep}3.5\n")
    with pytest.warns(DataWarning, match=f"the first line has no comma but 1 {word}s; reading it as {word}-separated"):
        s = load_series(p)
    assert s.values.tolist() == [2.5, 3.5]


def test_decimal_comma_gets_a_hint(tmp_path):
    p = write(tmp_path, "t;v\n1;2,5\n")
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"no column holds numbers \(last column: line 2, column 'v': '2,5' is not a number \(a decimal comma\?"):
        load_series(p)


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("text,column,message", [
    ("t,v\n1,2\n\n2,x\n", None, r"f\.csv: line 4, column 'v': 'x' is not a number"),
    ("t,v\n1,2\n2,nan\n", None, r"f\.csv: line 3, column 'v': nan \(NaN/inf values are not allowed\)"),
    ("t,v\n1,2\n2,-inf\n", None, r"f\.csv: line 3, column 'v': -inf \(NaN/inf"),
    ("t,v\n1,2\n2,1e400\n", None, r"f\.csv: line 3, column 'v': inf \(NaN/inf"),
    ("t,v\n1,2\n2,1e200\n", None, r"f\.csv: line 3, column 'v': 1e\+200 is too large"),
    ("t,v\n1,2\n2, 1e200\n", None, r"f\.csv: line 3, column 'v': 1e\+200 is too large"),
    ("t,v\n1,2\n\n\n2,\n", None, r"f\.csv: line 5 has no value in column 'v'"),
    ("t,v\n1,2\n2\n", "v", r"f\.csv: line 3 has no value in column 'v'"),
    ("t,v\n1,2,3\n", None, r"f\.csv: not a readable CSV file \(Expected 2 fields in line 2, saw 3\)"),
    ("t,v\n1,true\n", "v", r"f\.csv: line 2, column 'v': 'True' is not a number"),
    ("t,v\n1,2\n", "w", r"f\.csv: no column 'w'; available: 't', 'v'"),
    ("t,v\n1,2\n", 7, r"f\.csv: column index 7 out of range \(the file has 2 columns\)"),
    ("t,v\n", None, r"f\.csv: only a header row, no data"),
    ("t,v\n1,\n2,\n", None, r"f\.csv: column 'v' has no values"),
])
def test_every_error_names_file_line_and_column(tmp_path, text, column, message):
    p = write(tmp_path, text)
    with pytest.raises(DataError, match=message) as info:
        load_series(p, column)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", [
    'v\n1\n""\n  \n\n2\nx\n',           # typed read: '""' and spaces are rows, the empty line is not
    '\n\nt,v\n1,2\n3\n\n"a\nb",2\n4,x\n',  # a short row: the text read; a quoted line break
])
def test_line_numbers_are_physical_lines(text):
    with pytest.raises(DataError, match=f"line {text.count(chr(10))}, column 'v': 'x' is not a number"):
        parse_csv_text(text, fill="zero", source="f.csv")


def test_bad_options_are_errors(tmp_path):
    with pytest.raises(DataError, match="unknown fill 'mean'; choose one of ffill, interpolate, zero, drop"):
        load_panel("bundled:airline", fill="mean")
    with pytest.raises(DataError, match="unknown data format 'xls'"):
        load_panel("bundled:airline", format="xls")


def test_not_utf8_and_binary_files(tmp_path):
    p = tmp_path / "l1.csv"
    p.write_bytes("t,v\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"l1\.csv is not a UTF-8 text CSV file"):
        load_series(str(p))
    p.write_bytes(b"t,v\n1,2\x00\n")
    with pytest.raises(DataError, match="NUL bytes"):
        load_series(str(p))


@pytest.mark.parametrize("fill,expected", [("ffill", [1, 1, 1, 4, 4]), ("interpolate", [1, 2, 3, 4, 4]),
                                           ("zero", [1, 0, 0, 4, 0]), ("drop", [1, 4])])
def test_fill_options_on_one_column(tmp_path, fill, expected):
    p = write(tmp_path, "v\n1\n \n\"\"\n4\n\"\"\n")
    assert parse_csv_text(open(p).read(), fill=fill)[0].tolist() == expected
    with pytest.raises(DataError, match="line 3 has no value in column 'v'"):
        parse_csv_text(open(p).read(), source="f.csv")


def test_leading_gap_with_ffill_takes_the_first_value():
    assert parse_csv_text("v\n\"\"\n2\n3\n", fill="ffill")[0].tolist() == [2, 2, 3]


def test_big_files_announce_themselves(tmp_path, capsys):
    p = write(tmp_path, "t,v\n1,2\n2,3\n")
    load_series(p)
    assert capsys.readouterr().err == ""
    load_panel(p, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"vqext: reading {p} (") and err[1].startswith("vqext: read 2 rows, 1 series from")
