"""Trackers never hang (hostile stores and accounts): an MLflow store that is locked, a
FIFO, a folder or a port nothing answers on fails within trackers.STORE_TIMEOUT_S with one
line and exit 2 before anything is written; a store that fails mid-run is one warning
without MLflow's own output; a W&B project that is a path, or online mode without an API
key, is one line and exit 2. Only loopback addresses and local files: nothing here leaves
the machine."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deqctl.cli import app
from deqctl.engine import trackers
from deqctl.recipe import LogSettings, RecipeError

from cli_helpers import RECIPE, runner, tiny, train

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = ["train.max_steps=3", "train.eval_every_epoch=false"]
TIMEOUT = 1.0          # the tests' STORE_TIMEOUT_S: a locked store waits all of it
SLACK = 2.0            # what a loaded machine may add to a bounded wait


def one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    # raising=False: the test still runs (and fails by hanging) where the bound is missing
    monkeypatch.setattr(trackers, "STORE_TIMEOUT_S", TIMEOUT, raising=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(request, tmp_path):
    """The URI of a broken MLflow store of the kind `request.param` names."""
    kind = request.param
    held = []
    if kind == "locked":               # another connection holds SQLite's exclusive lock
        path = tmp_path / "locked.db"
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("CREATE TABLE t (x)")
        con.execute("BEGIN EXCLUSIVE")
        held.append(con)
        uri = f"sqlite:///{path}"
    elif kind == "fifo":
        os.mkfifo(tmp_path / "fifo.db")
        uri = f"sqlite:///{tmp_path / 'fifo.db'}"
    elif kind == "folder":
        (tmp_path / "folder.db").mkdir()
        uri = f"sqlite:///{tmp_path / 'folder.db'}"
    elif kind == "closed-port":
        uri = f"http://127.0.0.1:{_closed_port()}"
    else:                              # a listener that accepts and never answers
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        held.append(sock)
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield uri
    for thing in held:
        thing.close()


KINDS = ["locked", "fifo", "folder", "closed-port", "silent-port"]


@pytest.mark.parametrize("store", KINDS, indirect=True)
def test_a_broken_mlflow_store_fails_fast_with_one_line_before_anything_is_written(
        store, tmp_path):
    pytest.importorskip("mlflow")             # importing it is not the store's time
    pytest.importorskip("sqlalchemy")
    started = time.perf_counter()
    with pytest.raises(RecipeError, match=r"^log.mlflow_uri: "):
        trackers.check(LogSettings(mlflow=True, mlflow_uri=store))
    assert time.perf_counter() - started < TIMEOUT + SLACK

    run = tmp_path / "r"
    line = one_line_exit_2(train(RECIPE, *tiny(), *STEPS, "log.mlflow=true",
                                 f"log.mlflow_uri={store}", "--out", str(run)))
    assert line.startswith("error: log.mlflow_uri: ") and "log.mlflow=false" in line, line
    assert len(line) < 400
    assert not run.exists()


def test_the_store_in_mlflow_tracking_uri_is_checked_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    run = tmp_path / "r"
    line = one_line_exit_2(train(RECIPE, *tiny(), *STEPS, "log.mlflow=true", "--out", str(run)))
    assert line.startswith("error: MLFLOW_TRACKING_URI: "), line
    assert not run.exists()


def test_mlflows_bounds_do_not_stay_in_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")     # the user's own: kept
    before = dict(os.environ)
    with pytest.raises(RecipeError):
        trackers.check(LogSettings(mlflow=True, mlflow_uri=f"http://127.0.0.1:{_closed_port()}"))
    assert dict(os.environ) == before


def test_a_resumed_run_with_a_broken_store_is_refused_before_its_files_change(run, tmp_path):
    copy = tmp_path / "r"
    shutil.copytree(run, copy)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    line = one_line_exit_2(runner.invoke(app, [
        "train", "--resume", str(copy / "checkpoints" / "final"), "train.max_steps=3",
        "log.mlflow=true", f"log.mlflow_uri=http://127.0.0.1:{_closed_port()}", "--plain"]))
    assert line.startswith("error: log.mlflow_uri: "), line
    after = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert after == before


# --- a store that fails mid-run: deqctl's one warning, nothing of MLflow's ----------------


class _FakeMlflow(BaseHTTPRequestHandler):
    """Just enough of an MLflow tracking server's REST API for one deqctl run."""

    calls: list[str]

    def log_message(self, *args) -> None:
        pass

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.calls.append(self.path.split("?")[0])
        info = {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1", "status": "RUNNING",
                "lifecycle_stage": "active", "run_name": "r"}
        self._answer({"experiment": {"experiment_id": "1", "name": "deqctl",
                                     "lifecycle_stage": "active"}}
                     if "get-by-name" in self.path else {"run": {"info": info, "data": {}}})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.calls.append(self.path)
        if self.path.endswith("/runs/create"):
            self._answer({"run": {"info": {"run_id": "r1", "run_uuid": "r1",
                                           "experiment_id": "1", "status": "RUNNING",
                                           "lifecycle_stage": "active"}, "data": {}}})
        else:
            self._answer({})


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeMlflow)
    srv.calls = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


ROW = {"step": 1, "split": "train", "loss": 0.5}


def test_a_store_failing_mid_run_is_one_warning_without_mlflows_output(server, tmp_path, capfd):
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    warnings: list[str] = []
    t = trackers.Trackers(LogSettings(mlflow=True, mlflow_uri=uri), tmp_path, {"seed": 0}, None,
                          warnings.append)
    t.write(ROW)
    assert server.calls.count("/api/2.0/mlflow/runs/log-batch") == 2     # params, then the row
    server.shutdown()
    server.server_close()                     # the store goes away: connections refused
    started = time.perf_counter()
    t.write({**ROW, "step": 2})
    assert time.perf_counter() - started < TIMEOUT + SLACK
    assert len(warnings) == 1 and warnings[0].startswith("mlflow: stopped logging (")
    assert warnings[0].endswith("metrics.jsonl keeps every row")
    t.write({**ROW, "step": 3})               # dropped: no second warning, no wait
    t.close("finished")
    assert len(warnings) == 1
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


def test_mlflow_says_nothing_on_the_console(server, tmp_path, capfd):
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    t = trackers.Trackers(LogSettings(mlflow=True, mlflow_uri=uri), tmp_path, {"seed": 0}, None,
                          print)
    t.write(ROW)
    t.close("finished")                       # MLflow prints "View run ... at" here
    assert "/api/2.0/mlflow/runs/update" in server.calls
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


# --- W&B: the project is a name, online mode needs a key --------------------------------


@pytest.mark.parametrize("project", ["a/b", "a\\b", "..", "../up", "x/../y"])
def test_a_wandb_project_that_is_a_path_is_a_recipe_error(project, tmp_path):
    run = tmp_path / "r"
    done = train(RECIPE, *tiny(), *STEPS, "log.wandb=true", f"log.wandb_project={project}",
                 "--out", str(run))
    one_line_exit_2(done)                      # a recipe's report: its header, then its errors
    assert [line.strip() for line in done.output.splitlines()
            if "wandb" in line] == [f"log.wandb_project: expected a W&B project name (1 to "
                                    f"128 printable characters, none of / \\ # ? % : and no "
                                    f"'..'), got {project!r}"], done.output
    assert not run.exists()


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    """No W&B key anywhere wandb looks (env, ~/.netrc), and its server a closed loopback
    port, so that nothing could leave the machine whatever wandb tried."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    return home


def test_wandb_online_without_an_api_key_is_one_line_before_anything_is_written(
        no_wandb_key, tmp_path):
    run = tmp_path / "r"
    line = one_line_exit_2(train(RECIPE, *tiny(), *STEPS, "log.wandb=true",
                                 "log.wandb_mode=online", "--out", str(run)))
    assert line.startswith("error: log.wandb_mode: ") and "WANDB_API_KEY" in line, line
    assert not run.exists()


def test_wandb_online_finds_a_key_where_wandb_does(no_wandb_key, monkeypatch):
    online = LogSettings(wandb=True, wandb_mode="online")
    with pytest.raises(RecipeError, match="^log.wandb_mode: "):
        trackers.check(online)
    host = os.environ["WANDB_BASE_URL"].split("//")[1]       # wandb's key: host:port
    (no_wandb_key / ".netrc").write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
    trackers.check(online)                    # `wandb login` wrote ~/.netrc
    (no_wandb_key / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    trackers.check(online)
    trackers.check(LogSettings(wandb=True))   # offline needs no key
