"""Progress of long data work (issue 30: "tokenize once, with a progress bar"): fitting a
tokenizer and tokenizing a corpus report their bytes to the display a command set up; a
terminal gets bars, a log gets a line when the work starts and one every 30 s."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from deqctl import progress
from deqctl import recipe as recipes
from deqctl.cli import app
from deqctl.data import build_data
from deqctl.ui import TrainView
from deqctl.ui.work import WorkBars

from cli_helpers import CONFIGS, runner

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(f"line {i} of a corpus with words é{i % 7}\n" for i in range(3000))


class Recorder:
    def __init__(self):
        self.seen: list[tuple[str, int, int | None]] = []
        self.finished: list[str] = []

    def update(self, label, done, total):
        self.seen.append((label, done, total))

    def finish(self, label):
        self.finished.append(label)


def test_work_reports_nothing_without_a_display():
    with progress.tracked("x", 10) as advance:
        advance(5)                          # nothing to report to, nothing raised


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_fitting_and_tokenizing_report_every_byte_of_the_text(tmp_path, monkeypatch, kind):
    from deqctl.data import tokens
    monkeypatch.setattr(tokens, "CHUNK_CHARS", 4096)     # several chunks: several updates
    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "test.txt").write_text(TEXT[:9000], encoding="utf-8")
    cfg = recipes.validate({"data": {
        "name": "text", "seq_len": 16, "tokenizer": kind, "vocab_size": 300,
        "root": str(tmp_path / "cache"),
        "files": {"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")}}}).data
    shown = Recorder()
    with progress.shown_by(shown):
        build_data(cfg)
    labels = list(dict.fromkeys(label for label, _, _ in shown.seen))
    assert [label.split(" ")[0] for label in labels] == ["fitting", "tokenizing", "tokenizing"]
    assert shown.finished == labels
    for label in labels:
        done = [d for lab, d, _ in shown.seen if lab == label]
        total = {t for lab, _, t in shown.seen if lab == label}
        size = len((TEXT[:9000] if "test.txt" in label else TEXT).encode())
        assert done == sorted(done) and len(done) > 2 and total == {size} and done[-1] == size
    shown = Recorder()
    with progress.shown_by(shown):
        build_data(cfg)                     # from the cache: no work, nothing shown
    assert shown.seen == []


def test_a_log_gets_a_line_when_work_starts_then_one_every_30_s(monkeypatch):
    lines, clock = [], [100.0]
    monkeypatch.setattr("deqctl.ui.work.time.monotonic", lambda: clock[0])
    bars = WorkBars(Console(file=io.StringIO()), plain=True, say=lines.append)
    for t, done in ((100, 0), (110, 2_000_000), (131, 3_500_000), (140, 4_000_000)):
        clock[0] = t
        bars.update("tokenizing a.txt", done, 5_000_000)
    bars.finish("tokenizing a.txt")
    assert lines == ["tokenizing a.txt (5.0 MB)", "tokenizing a.txt: 3.5 MB of 5.0 MB"]


def test_the_live_view_shows_a_bar_while_the_work_runs():
    out = io.StringIO()
    view = TrainView(10, fwd_tol=1e-3, bwd_tol=1e-4, plain=False,
                     console=Console(file=out, force_terminal=True, width=160))
    with view, progress.shown_by(view.work):
        with progress.tracked("tokenizing big.txt", 2_000_000) as advance:
            advance(1_000_000)
            view._live.refresh()
            assert "tokenizing big.txt" in out.getvalue() and "1.0/2.0 MB" in out.getvalue()
    assert not view.work.bars.tasks          # gone once done


def test_deqctl_data_says_what_it_tokenizes_on_stderr_and_keeps_stdout_json(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    result = runner.invoke(app, [
        "data", str(CONFIGS / "shakespeare-deq.yaml"), "data.name=text",
        f"data.files.train={tmp_path / 't.txt'}", f"data.files.test={tmp_path / 't.txt'}",
        f"data.root={tmp_path / 'cache'}", "data.tokenizer=word", "--json"])
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)
    assert "tokenizing" in result.stderr and "fitting the word tokenizer" in result.stderr
