"""Hostile input to `deqctl predict`: an output never replaces an input, globs survive
symlink loops and huge trees, a CSV is read within a memory bound set by the model's
window, and a file name that is not UTF-8 is a bad input, not a crash."""

from __future__ import annotations

import csv
import io
import json
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import deqctl
from deqctl.cli import app
from deqctl.predict import Failed, Item, Reader
from deqctl.predict import inputs as predict_inputs

from cli_helpers import runner
from test_predict import forecaster  # noqa: F401  (a fixture: one trained forecaster)

pytestmark = pytest.mark.usefixtures("one_thread")


def predict(*args):
    return runner.invoke(app, ["predict", *map(str, args)])


def one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def skipped(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("skipped")]


def digit(path: Path, value: int = 128) -> Path:
    Image.fromarray(np.full((28, 28), value, np.uint8)).save(path)
    return path




# --- 3: an output is never one of the inputs ------------------------------------------


def test_out_never_replaces_an_input_even_with_force(run, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    image = digit(data / "one.png")
    series = data / "s.csv"
    series.write_text("date,co2\n1,370\n")
    (tmp_path / "link.csv").symlink_to(series)
    before = series.read_bytes()
    for given, out in ((series, series), (series, tmp_path / "link.csv"),
                       (tmp_path / "link.csv", series),
                       (series, data / ".." / "data" / "s.csv"),
                       (f"{data}/*", series),                  # a glob's match
                       (image, run / "metrics.jsonl")):         # a run's own file
        line = one_line_exit_2(predict(run, given, image, "--out", out, "--force"))
        assert "--force does not apply" in line, (given, out, line)
        assert series.read_bytes() == before
    assert (run / "metrics.jsonl").read_text().startswith("{")
    fine = predict(run, image, "--out", data / "p.csv")
    assert fine.exit_code == 0, fine.output
    assert [r["input"] for r in csv.DictReader(io.StringIO((data / "p.csv").read_text()))] \
        == [str(image)]


# --- 4: globs and folders: symlink loops, huge trees ----------------------------------


def test_a_glob_through_symlink_loops_finds_each_file_once_and_fast(run, tmp_path):
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    digit(root / "a.png")
    digit(root / "sub" / "b.png")
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)    # a loop
    started = time.perf_counter()
    result = predict(run, f"{root}/**/*.png", "--json")
    assert result.exit_code == 0, result.output
    names = [json.loads(line)["input"] for line in result.stdout.splitlines()]
    both = [str(root / "a.png"), str(root / "sub" / "b.png")]
    assert names == both
    # two loops: 2**40 spellings of each file for a walk that follows them blindly
    (root / "sub" / "again").symlink_to(root / "sub", target_is_directory=True)
    for given, expected in ((f"{root}/**/*.png", both), (root, ["a.png", "sub/b.png"])):
        result = predict(run, given, "--json")
        assert result.exit_code == 0, result.output
        assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == expected
    assert time.perf_counter() - started < 30


def test_a_walk_past_the_entry_bound_stops_with_one_line(run, tmp_path, monkeypatch):
    monkeypatch.setattr(predict_inputs, "MAX_ENTRIES", 50)
    tree = tmp_path / "tree"
    for i in range(10):
        (tree / f"d{i}").mkdir(parents=True)
        for j in range(10):
            (tree / f"d{i}" / f"{j}.txt").write_text("")
    image = digit(tmp_path / "fine.png")
    for given in (f"{tree}/**/*.png", tree, f"{tree}/*/*.png"):
        result = predict(run, given, image, "--json")
        assert result.exit_code == 1, result.output
        (line,) = skipped(result)
        assert "more than 50" in line and str(tree) in line, line
        assert [json.loads(r)["input"] for r in result.stdout.splitlines()] == [str(image)]


# --- 5: a CSV is read within a bound set by the window, not the file -------------------


def weekly(rows: int, start: int = 0) -> str:
    return "".join(f"{start + i},{370 + 0.01 * ((start + i) % 97):.2f}\n" for i in range(rows))


def read_peak(reader: Reader, path: Path) -> tuple[list, int]:
    tracemalloc.start()
    try:
        entries = list(reader.read([str(path)]))
        return entries, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_one_enormous_csv_line_is_refused_in_small_memory(forecaster, tmp_path):
    big = tmp_path / "big.csv"
    with open(big, "w") as fh:
        fh.write("date,co2\n" + weekly(20))
        fh.write(",".join(["1"] * 4_000_000) + "\n")           # 8 MB on one line
        fh.write(weekly(10, start=20))
    size = big.stat().st_size
    reader = Reader(deqctl.load(forecaster).info)
    (entry,), peak = read_peak(reader, big)
    assert isinstance(entry, Failed) and "line 22" in entry.reason, entry
    assert peak < size / 8, (peak, size)
    good = tmp_path / "good.csv"
    good.write_text("date,co2\n" + weekly(20))
    result = predict(forecaster, big, good)
    assert result.exit_code == 1
    (line,) = skipped(result)
    assert "big.csv" in line and "line 22" in line
    assert {r["input"] for r in csv.DictReader(io.StringIO(result.stdout))} == {str(good)}


def test_a_long_csv_is_read_in_memory_set_by_the_window(forecaster, tmp_path):
    long, tail = tmp_path / "long.csv", tmp_path / "tail.csv"
    lines = weekly(20_000).splitlines(keepends=True)
    lines[-8] = lines[-8].split(",")[0] + ",\n"      # a gap at the window's start: carried
    long.write_text("date,co2\n" + "".join(lines))
    tail.write_text("date,co2\n" + "".join(lines[-100:]))
    reader = Reader(deqctl.load(forecaster).info)
    (item,), peak = read_peak(reader, long)
    assert isinstance(item, Item), item
    assert peak < long.stat().st_size / 4, peak           # of 250 KB: the window's rows
    (same,), _ = read_peak(reader, tail)
    assert item.x.tolist() == same.x.tolist() and item.times == same.times == \
        ["20000", "20001", "20002"]
    assert item.x[0, 0].item() == pytest.approx(float(lines[-9].split(",")[1]))
    # rows out of time order are read in time order, as training reads them
    shuffled = tmp_path / "shuffled.csv"
    rows = lines[-100:]
    shuffled.write_text("date,co2\n" + "".join(rows[1::2] + rows[0::2]))
    (again,), _ = read_peak(reader, shuffled)
    assert again.x.tolist() == item.x.tolist() and again.times == item.times


# --- 6: a file name that is not UTF-8 -------------------------------------------------


def test_a_name_that_is_not_utf8_is_a_bad_input_and_the_others_are_written(run, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = digit(folder / "good.png")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="PNG")
    for raw, content in ((b"\xff.png", buf.getvalue()), (b"\xfe-broken.png", b"junk")):
        fd = os.open(os.fsencode(folder) + b"/" + raw, os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, content)
        os.close(fd)
    strange = os.fsdecode(os.fsencode(folder) + b"/\xff.png")
    for args, first in (([good, strange], str(good)), ([folder], "good.png")):
        for out in (tmp_path / "p.csv", tmp_path / "p.jsonl"):
            result = predict(run, *args, "--out", out, "--force")
            assert result.exit_code == 1, result.output
            assert "Traceback" not in result.output and "UnicodeEncodeError" not in result.output
            lines = skipped(result)
            assert lines and all("not valid UTF-8" in s for s in lines), lines
            assert any("\\xff.png" in s for s in lines), lines
            text = out.read_text(encoding="utf-8")
            rows = (list(csv.DictReader(io.StringIO(text))) if out.suffix == ".csv"
                    else [json.loads(r) for r in text.splitlines()])
            assert [r["input"] for r in rows] == [first]
