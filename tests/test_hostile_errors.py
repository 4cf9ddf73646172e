"""Hostile tests of the newest surfaces (issues 30 and 31): errors raised in user code and
progress output nobody reads. Each test pins a failure found by trying to break them; the
finding's number is in its comment (tests/test_hostile_scale.py has the others)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


from cli_helpers import RECIPE, train
from test_hostile_scale import ENV, text_data
from test_open import DATA, SMALL

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = str(Path(RECIPE).parent / "sequential-mnist-deq.yaml")
SEQ_SMALL = ["model.d_model=16", "model.d_ff=16", "model.heads=2", "deq.forward.max_iter=8",
             "data.n=64"]


# -- finding 2: an exception from user code whose __str__ raises -----------------------------

def user_data(tmp_path: Path, statement: str) -> tuple[Path, int]:
    """The test_open data function with `statement` as its first line; its file and line."""
    source = DATA.replace("    rng = np.random.default_rng(seed)",
                          f"    {statement}\n    rng = np.random.default_rng(seed)")
    path = tmp_path / "blobs.py"
    path.write_text(source)
    return path, source[: source.index(statement)].count("\n") + 1


def train_user_data(tmp_path: Path, statement: str):
    path, line = user_data(tmp_path, statement)
    result = train(SEQ, f"data.name={path}:blobs", *SEQ_SMALL, *SMALL,
                   "--out", str(tmp_path / "run"))
    return result, f"blobs.py:{line}"


def test_an_exception_whose_str_raises_is_still_one_line_naming_the_users_line(tmp_path):
    # Finding 2: cli/common.user_errors calls str(exc); a user exception whose __str__
    # raises escapes as a ZeroDivisionError traceback instead of one line.
    result, where = train_user_data(
        tmp_path, 'raise type("Weird", (Exception,), {"__str__": lambda self: 1 / 0})()')
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert result.exit_code == 1, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and where in errors[0] and "Weird" in errors[0], result.output


# -- finding 3: user code that exits: SystemExit and other BaseExceptions -------------------

@pytest.mark.parametrize("statement, said", [
    ("raise SystemExit", "SystemExit in user code"),    # exit 0: a run that never trained
    ("import sys; sys.exit(3)", "SystemExit in user code"),        # exit 3, nothing said
    ('import sys; sys.exit("bye")', "SystemExit in user code"),    # exit 1, no file:line
    ('raise type("Stop", (BaseException,), {})("stop")', "Stop in user code"),  # traceback
])
def test_user_code_that_exits_is_one_line_naming_its_line(tmp_path, statement, said):
    # Finding 3: only Exception and KeyboardInterrupt are caught; SystemExit from a user's
    # data function passes straight through (`deqctl train` exits 0 having trained
    # nothing), and a BaseException subclass escapes with a traceback.
    result, where = train_user_data(tmp_path, statement)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert result.exit_code == 1, result.output          # as any failure of user code
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and where in errors[0] and said in errors[0], result.output


def test_an_os_error_raised_in_user_code_names_the_users_line(tmp_path):
    # Finding 9: an OSError subclass (FileNotFoundError) raised by the user's own code is
    # taken for deqctl's input error: "error: [Errno 2] No such file: ..." with no file:line.
    result, where = train_user_data(
        tmp_path, 'raise FileNotFoundError(2, "No such file", "/nope/data.bin")')
    assert result.exit_code == 1, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and where in errors[0], result.output
    assert "FileNotFoundError in user code" in errors[0] and "/nope/data.bin" in errors[0]


# -- finding 5: progress lines into a stderr nobody reads ------------------------------------

def test_deqctl_data_finishes_when_its_stderr_reader_is_gone(tmp_path):
    # Finding 5: a progress line written into a closed pipe raises BrokenPipeError, which
    # ends `deqctl data` with exit 1 before it prints its report: progress is a side
    # channel and must never cost the work or the result.
    cfg_dir = tmp_path / "t"
    cfg_dir.mkdir()
    text_data(cfg_dir)
    read_end, write_end = os.pipe()
    os.close(read_end)                                 # whoever read stderr has gone
    try:
        done = subprocess.run(
            [sys.executable, "-m", "deqctl", "data", str(Path(RECIPE).parent /
                                                         "shakespeare-deq.yaml"),
             "data.name=text", "data.tokenizer=word", f"data.root={tmp_path / 'cache'}",
             f"data.files.train={cfg_dir / 'train.txt'}", f"data.files.test={cfg_dir / 'test.txt'}",
             "model.d_model=16", "model.heads=2", "model.d_ff=16", "--json"],
            stdout=subprocess.PIPE, stderr=write_end, timeout=120, env=ENV, text=True)
    finally:
        os.close(write_end)
    assert done.returncode == 0 and '"splits"' in done.stdout, (done.returncode, done.stdout)




def test_a_display_that_cannot_be_written_stops_showing_and_the_work_goes_on():
    # Finding 5, below the command: whatever display a command set up, an OSError writing
    # it (a closed pipe, a full disk) is the display's end, never the work's.
    from deqctl import progress

    calls = []

    class Gone:
        def update(self, label, done, total):
            calls.append(done)
            raise BrokenPipeError(32, "Broken pipe")

        def finish(self, label):
            raise BrokenPipeError(32, "Broken pipe")

    with progress.shown_by(Gone()):
        for _ in range(2):
            with progress.tracked("tokenizing", 10) as advance:
                advance(4)
                advance(6)
    assert calls == [0]                   # tried once, then no more progress was shown


def test_a_second_signal_while_user_code_runs_is_deqctls_exit_not_the_users(tmp_path):
    # The fix of finding 3 must not claim deqctl's own exit: a second SIGTERM aborts with
    # SystemExit(143) from deqctl's signal handler, whatever user code it interrupts.
    import importlib.util
    import signal

    from deqctl.cli.common import user_errors
    from deqctl.engine.signals import StopOnSignal
    from deqctl.errors import from_user_code, user_frame

    (tmp_path / "slow.py").write_text(
        "import os, signal, time\n\ndef step():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(10)\n")
    spec = importlib.util.spec_from_file_location("slow_user_step", tmp_path / "slow.py")
    slow = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(slow)
    with StopOnSignal() as stop, pytest.raises(SystemExit) as exited:
        stop.signum = signal.SIGTERM          # the first signal came already
        user_errors(slow.step)()
    assert exited.value.code == 128 + signal.SIGTERM
    assert user_frame(exited.value).filename == str(tmp_path / "slow.py")   # it was running
    assert from_user_code(exited.value) is None


# -- finding 6: a table printed into a pipe whose reader has gone ---------------------------

@pytest.mark.parametrize("when", ["before", "after the first line"])
def test_eval_into_a_pipe_its_reader_closes_ends_quietly(run, when):
    # Finding 6: `deqctl eval RUN | head -1` exited 1 with nothing on stderr (Rich's
    # console exits 1 on a broken pipe), and with the reader gone before the first line,
    # "error: BrokenPipeError" and exit 1. `generate` ends quietly with exit 0, as the
    # shell's own tools do: so must every command that prints its result on stdout.
    read_end, write_end = os.pipe()
    if when == "before":
        os.close(read_end)
    proc = subprocess.Popen([sys.executable, "-m", "deqctl", "eval", str(run)],
                            stdout=write_end, stderr=subprocess.PIPE, env=ENV)
    os.close(write_end)
    try:
        if when != "before":
            with os.fdopen(read_end, "rb") as reader:
                assert reader.readline().startswith(str(run).encode())   # head -1
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 0, err
    assert "Error" not in err and "Traceback" not in err and "error" not in err, err
