"""Malformed input files: the CSV loader raises DataError; the CLI prints one line and exits 1."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqext.cli import main
from vqext.data import load_series
from vqext.errors import DataError

LONG_LINE = "x," + "9" * 200_000 + "\n"
MALFORMED = {
    "empty": b"",
    "blank lines": b"\n\n  \n",
    "header only": b"date,value\n",
    "mixed types": b"t,v\n1,2.5\n2,abc\n3,4\n",
    "no numeric column": b"a,b\nx,y\nz,w\n",
    "missing cells": b"t,v\n1,2\n2,\n3,4\n",
    "ragged rows": b"t,v\n1\n2\n3\n",
    "nan value": b"v\n1\nnan\n3\n",
    "inf value": b"v\n1\n1e400\n3\n",
    "huge values": ("v\n" + "".join(f"{(-1) ** i * 1e300}\n" for i in range(40))).encode(),
    "unicode values": "wert\u00e9\u2603\n".encode() + "".join(f"\u2603{i}\u00bd\n" for i in range(40)).encode(),
    "very long line": ("t,v\n" + LONG_LINE * 3).encode(),
    "binary junk": bytes(range(256)) * 8,
    "latin-1": "t,v\n1,caf\xe9\n".encode("latin-1"),
    "nul bytes": b"t,v\n1,2\x00\n2,3\n",
    "too short": b"v\n1\n2\n3\n",
}


def one_error_line(result):
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("vqext: error: "), result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_cli_run_with_a_malformed_csv_prints_one_error_line(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.csv"
    path.write_bytes(MALFORMED[name])
    r = CliRunner().invoke(main, ["run", "--arch", "vqlnmlp", "--vocab-size", "8", "--d-model", "4", "-T", "4",
                                  "--epochs", "1", "--data", str(path), "--quiet", "--device", "cpu"])
    one_error_line(r)
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")  # nothing trained


def test_unicode_header_and_digits_are_accepted(tmp_path):
    # Python's float() reads any Unicode decimal digits: "\u0663" (Arabic-Indic three) is 3.
    path = tmp_path / "unicode.csv"
    path.write_text("zeit,wert\u00e9\u2603\n" + "".join(f"{i},\u0663{i}\n" for i in range(40)), encoding="utf-8")
    series = load_series(str(path))
    assert series.column == "wert\u00e9\u2603" and series.values[1] == 31.0


@pytest.mark.parametrize("name", ["empty", "binary junk", "header only", "huge values"])
def test_cli_forecast_with_a_malformed_csv_prints_one_error_line(name, tmp_path):
    r = CliRunner().invoke(main, ["run", "--arch", "vqlnmlp", "--vocab-size", "8", "--d-model", "4", "-T", "4",
                                  "--epochs", "1", "--data", "synthetic:sine:30", "--quiet", "--device", "cpu",
                                  "--out", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    run_dir = r.output.strip().splitlines()[-1].split("run directory: ")[1]
    path = tmp_path / "bad.csv"
    path.write_bytes(MALFORMED[name])
    one_error_line(CliRunner().invoke(main, ["forecast", "--run", run_dir, "--data", str(path), "--horizon", "3"]))
    one_error_line(CliRunner().invoke(main, ["forecast", "--run", run_dir, "--data", str(path), "--origin", "start"]))


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"[1, 2]", b'{"val_loss": "x"}'])
def test_cli_report_with_a_damaged_run_dir_skips_it_with_one_note(content, tmp_path):
    run = tmp_path / "label" / "stamp"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.json").write_bytes(content)
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    # the damaged run is skipped with one note naming its file; with nothing left, one error line
    assert len(lines) == 2 and lines[0].startswith("note: skipping") and "metrics.json" in lines[0], r.output
    assert "no finished runs" in lines[1], r.output


CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**30, 10**30).map(str),
    st.text(max_size=12),
    st.sampled_from(["", " ", '"', '""', "nan", "-inf", "1e999", "1,5", "\u00a0", "\x00", "\r"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.lists(CELLS, min_size=0, max_size=4), max_size=8),
       junk=st.binary(max_size=40), column=st.sampled_from([None, "0", "1", "-1", "v", "9"]))
def test_loader_returns_finite_values_or_raises_data_error(rows, junk, column, tmp_path_factory):
    path = tmp_path_factory.mktemp("csv") / "fuzz.csv"
    text = "\n".join(",".join(r) for r in rows)
    path.write_bytes(text.encode("utf-8", "surrogatepass") + junk if junk else text.encode("utf-8", "surrogatepass"))
    try:
        series = load_series(str(path), column)
    except DataError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    assert len(series.values) >= 1 and np.isfinite(series.values).all()
