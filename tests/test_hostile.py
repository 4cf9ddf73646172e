"""Hostile and broken input (issue 15): bounded resources, bad data named as bad data, and
one line with exit 2 for every file a user can be sent, through the CLI and deqctl.load."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import deqctl
from deqctl import recipe as recipes
from deqctl.cli import app

from cli_helpers import RECIPE, rows, runner, train

BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] +
                 [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]"
                  for p, c in zip("abcdefgh", "bcdefghi")]) + "\n"

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_exit_2(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


# --- YAML: aliases, duplicates, depth, size ----------------------------------------------


def test_an_alias_bomb_is_refused_fast_and_small(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 600
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(recipes.RecipeError, match="aliases expand this document past"):
        recipes.load(path)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 100 * 2**20, (elapsed, peak)
    line = one_line_exit_2(train(str(path)))
    assert len(line) < 200


def test_an_alias_bomb_in_a_received_checkpoint_is_one_line(run, tmp_path):
    bad = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "final", bad)
    (bad / "recipe.yaml").write_text(BOMB)
    started = time.perf_counter()
    line = one_line_exit_2(runner.invoke(app, ["eval", str(bad)]))
    assert "aliases expand" in line and time.perf_counter() - started < 5
    with pytest.raises(deqctl.CheckpointError, match="aliases expand"):
        deqctl.load(bad)


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\noptim:\n  lr: 1.0e-3\n  lr: 5.0e-3\n")
    with pytest.raises(recipes.RecipeError, match=r"duplicate key 'lr' \(lines 3 and 4\)"):
        recipes.load(path)


def test_deep_nesting_and_huge_recipes_are_refused(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(recipes.RecipeError, match="nested more than 32 levels"):
        recipes.load(deep)
    huge = tmp_path / "huge.yaml"
    huge.write_text("name: x\n" + "#" * (2**21) + "\n")
    with pytest.raises(recipes.RecipeError, match="larger than 1 MB"):
        recipes.load(huge)
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text("a: &a [*a]\n")
    with pytest.raises(recipes.RecipeError, match="refers to a value that contains it"):
        recipes.load(cyclic)


def test_a_fifo_recipe_or_meta_never_blocks(run, tmp_path):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in one_line_exit_2(train(str(fifo)))
    bad = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "final", bad)
    (bad / "meta.json").unlink()
    os.mkfifo(bad / "meta.json")
    assert "not a regular file" in one_line_exit_2(runner.invoke(app, ["eval", str(bad)]))


def test_an_error_quotes_at_most_about_80_characters_of_a_value():
    value = "x" * 5000
    for override in (f"optim.name={value}", f"deq.forward.tol={value}", f"name={value}",
                     f"data.name={value}", f"{value}"):
        with pytest.raises(recipes.RecipeError) as err:
            recipes.load(RECIPE, [override])
        for line in str(err.value).splitlines():
            assert len(line) < 400, line
            assert "x" * 90 not in line


# --- iteration bounds ---------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["export", "RUN", "--format", "pt2", "--out", "OUT/m.pt2", "--iters", "99999999999999999999"],
    ["export", "RUN", "--format", "pt2", "--out", "OUT/m.pt2", "--iters", "1001"],
    ["eval", "RUN", "--sweep-iters", "1,99999999999999"],
    ["eval", "RUN", "--sweep-iters", "9" * 5000],
    ["eval", "RUN", "deq.eval.max_iter=10001"],
    ["solve-trace", "RUN", "--max-iter", "10001"],
    ["solve-trace", "RUN", "--power-iters", "10001"],
])
def test_iteration_counts_have_upper_bounds(run, tmp_path, args):
    args = [str(run) if a == "RUN" else a.replace("OUT", str(tmp_path)) for a in args]
    started = time.perf_counter()
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert time.perf_counter() - started < 5 and not list(tmp_path.iterdir())


# --- data files ---------------------------------------------------------------------------


def _digits(root: Path) -> None:
    from PIL import Image
    for part in ("train", "test"):
        for cls in ("a", "b"):
            (root / part / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / part / cls / f"{i}.png")


def _never_blocks(fn, seconds: float = 60):
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "blocked on a FIFO"
    return result["r"]


def test_a_fifo_in_an_image_folder_is_named_not_waited_on(tmp_path):
    _digits(tmp_path / "imgs")
    os.mkfifo(tmp_path / "imgs" / "train" / "a" / "blocker.png")
    line = one_line_exit_2(_never_blocks(lambda: train(
        RECIPE, "data.name=imagefolder", f"data.root={tmp_path / 'imgs'}",
        "model.channels=8", "model.inner_channels=16", "train.max_steps=1",
        "--out", str(tmp_path / "run"))))
    assert "blocker.png: not a regular file" in line


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def npz_train(path: Path, tmp_path: Path):
    return train(RECIPE, "data.name=npz", f"data.path={path}", "data.augment=false",
                 "model.channels=8", "model.inner_channels=16", "train.max_steps=1",
                 "--out", str(tmp_path / "run"))


def test_an_npz_that_expands_beyond_memory_is_refused_before_reading(tmp_path):
    """Headers that promise terabytes in a file of a few hundred bytes."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for name, shape in (("x", (10**6, 1000, 1000)), ("y", (10**6,)),
                            ("x_test", (4, 28, 28)), ("y_test", (4,))):
            header = {"descr": "<f4" if name.startswith("x") else "<i8",
                      "fortran_order": False, "shape": shape}
            with zf.open(f"{name}.npy", "w") as fh:
                np.lib.format.write_array_header_1_0(fh, header)  # noqa: the data never comes
                fh.write(b"\0" * 16)
    assert path.stat().st_size < 2000
    started = time.perf_counter()
    line = one_line_exit_2(npz_train(path, tmp_path))
    assert "needs about" in line and "GB in memory" in line and "x alone is" in line
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("damage, says", [
    ("nan-x", "x holds NaN, inf or values beyond float32 (1 value(s), the first at index (3, 5, 0))"),
    ("inf-y", "y_test holds NaN, inf or values beyond float32 (1 value(s), the first at index (2,))"),
    ("empty", "x: shape (16, 0, 1) holds samples of length 0"),
    ("label", "y: label 123456789 at index 7 is out of range"),
    ("negative", "y: label -1 at index 0 is out of range"),
])
def test_bad_npz_data_is_named_with_its_array_and_index(tmp_path, damage, says):
    x = np.random.rand(16, 12, 1).astype(np.float32)
    y = np.arange(16) % 2
    xt, yt = x[:4].copy(), y[:4].copy()
    if damage == "nan-x":
        x[3, 5, 0] = np.nan
    elif damage == "inf-y":
        yt = yt.astype(np.float32)
        y = y.astype(np.float32)
        yt[2] = np.inf
    elif damage == "empty":
        x = np.zeros((16, 0, 1), np.float32)
    elif damage == "label":
        y[7] = 123456789
    else:
        y[0] = -1
    path = _npz(tmp_path / "d.npz", x=x, y=y, x_test=xt, y_test=yt)
    result = train(str(Path(RECIPE).parent / "sequential-mnist-deq.yaml"), "data.name=npz",
                   f"data.path={path}", "data.augment=false", "train.max_steps=1",
                   "--out", str(tmp_path / "run"))
    line = one_line_exit_2(result)
    assert says in line and "non-finite" not in line, line


@pytest.mark.parametrize("cells, says", [
    (["2001-01-01,1.0", "2001-01-08,nan", "2001-01-15,2.0"], "line 3: v = 'nan' is not a finite float32 number"),
    (["2001-01-01,1.0", "2001-01-08,inf"], "line 3: v = 'inf' is not a finite float32 number"),
    (["2001-01-01,1.0", "2001-01-08,2.0", "2001-01-01,3.0"], "lines 2 and 4 have the same t ('2001-01-01')"),
    (["1,1.0", "inf,2.0"], "line 3: time 'inf' is neither a number nor a date"),
])
def test_bad_csv_values_and_time_stamps_are_named(tmp_path, cells, says):
    path = tmp_path / "s.csv"
    path.write_text("t,v\n" + "\n".join(cells) + "\n")    # refused as it is read
    result = train(str(Path(RECIPE).parent / "co2-forecast-deq.yaml"), "data.name=csv",
                   f"data.path={path}", "data.time_column=t", "data.columns=[v]",
                   "train.max_steps=1", "--out", str(tmp_path / "run"))
    assert says in one_line_exit_2(result)


# --- tampered checkpoints and exports -----------------------------------------------------


def _export(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "m.safetensors"
    assert runner.invoke(app, ["export", str(run), "--format", "safetensors", "--out",
                               str(out)]).exit_code == 0
    return out


@pytest.mark.parametrize("damage", ["no-recipe", "bad-json", "deep-json", "info-list",
                                    "info-types", "recipe-bomb", "recipe-not-a-recipe"])
def test_a_tampered_export_is_exit_2_and_a_checkpoint_error(run, tmp_path, damage):
    good = _export(run, tmp_path)
    with safe_open(str(good), framework="pt") as fh:
        meta = dict(fh.metadata())
    state = load_file(good)
    if damage == "no-recipe":
        del meta["recipe"]
    elif damage == "bad-json":
        meta["data_info"] = "{not json"
    elif damage == "deep-json":
        meta["data_info"] = "[" * 100000 + "]" * 100000
    elif damage == "info-list":
        meta["data_info"] = "[1, 2]"
    elif damage == "info-types":
        info = json.loads(meta["data_info"])
        meta["data_info"] = json.dumps({**info, "shape": "abc", "num_classes": -3})
    elif damage == "recipe-bomb":
        meta["recipe"] = BOMB
    else:
        meta["recipe"] = "- just\n- a list\n"
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=meta)
    one_line_exit_2(runner.invoke(app, ["eval", str(bad)]))
    with pytest.raises(deqctl.CheckpointError):
        deqctl.load(bad)


@pytest.mark.parametrize("field, value", [
    ("state.step", "three"), ("state.step", -4), ("state.pos", 10**30),
    ("state.wall_s", "soon"), ("state.eval_pending", "yes"), ("state.extra", 1),
    ("state", [1, 2]), ("state.deq_step", -1), ("state.deq_last_nfe", "x"), ("optimizer", {}),
    ("optimizer.param_groups", "all"), ("state.pending", "many"),
    ("state.pending", [[{"loss": "x"}]]),
])
def test_tampered_trainer_state_is_one_line_on_resume(run, tmp_path, field, value):
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    ckpt = bad / "checkpoints" / "final"
    state = json.loads((ckpt / "trainer.json").read_text())
    node, *path = field.split(".")
    if path:
        state[node][path[0]] = value
    else:
        state[node] = value
    (ckpt / "trainer.json").write_text(json.dumps(state))
    before = rows(bad)
    line = one_line_exit_2(train("--resume", str(bad), "train.max_steps=4"))
    assert "trainer" in line
    assert rows(bad) == before


@pytest.mark.parametrize("damage", ["negative-step", "bool-step", "metrics-list", "info-missing",
                                    "info-classes", "deep"])
def test_tampered_meta_is_one_line_and_a_checkpoint_error(run, tmp_path, damage):
    bad = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "final", bad)
    meta = json.loads((bad / "meta.json").read_text())
    if damage == "negative-step":
        meta["step"] = -2
    elif damage == "bool-step":
        meta["step"] = True
    elif damage == "metrics-list":
        meta["metrics"] = [1]
    elif damage == "info-missing":
        del meta["data_info"]["shape"]
    elif damage == "info-classes":
        meta["data_info"]["num_classes"] = 10**12
    text = json.dumps(meta) if damage != "deep" else "[" * 100000 + "]" * 100000
    (bad / "meta.json").write_text(text)
    one_line_exit_2(runner.invoke(app, ["eval", str(bad)]))
    with pytest.raises(deqctl.CheckpointError):
        deqctl.load(bad)


def test_a_recipe_asking_for_a_huge_model_is_refused_before_allocating(run, tmp_path):
    bad = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "final", bad)
    text = (bad / "recipe.yaml").read_text()
    (bad / "recipe.yaml").write_text(text.replace("channels: 8", "channels: 2000000", 1))
    tracemalloc.start()
    line = one_line_exit_2(runner.invoke(app, ["eval", str(bad)]))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "weights do not match" in line or "needs" in line
    assert peak < 200 * 2**20


# --- metrics files ------------------------------------------------------------------------


def test_compare_reads_a_run_with_a_cut_off_last_line(run, tmp_path):
    cut = tmp_path / "run"
    shutil.copytree(run, cut)
    n = len(rows(run))
    with open(cut / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "split": "tra')
    result = runner.invoke(app, ["compare", str(cut), "--json"])
    assert result.exit_code == 0, result.output
    assert f"line {n + 1} is not JSON" in result.stderr and result.stderr.count("warning") == 1
    assert json.loads(result.stdout)["runs"][0]["steps"] == 2


def test_a_broken_line_elsewhere_is_named_by_its_number(run, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (broken / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    line = one_line_exit_2(runner.invoke(app, ["compare", str(broken)]))
    assert "line 2 is not JSON" in line
    line = one_line_exit_2(train("--resume", str(broken), "train.max_steps=3"))
    assert "line 2 is not JSON" in line


def test_a_full_disk_while_writing_metrics_is_one_line_and_no_cut_off_row(tmp_path, monkeypatch):
    """The disk fills in the middle of a row: half of it reaches the file, then ENOSPC."""
    import errno

    real_fdopen = os.fdopen
    out = tmp_path / "run"

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[:len(data) // 2])
            self.fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def filling(fd, *args, **kwargs):
        fh = real_fdopen(fd, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{fd}")
        second = name.endswith("metrics.jsonl") and os.path.getsize(name) > 0
        return Full(fh) if second else fh     # from the second row on
    monkeypatch.setattr(os, "fdopen", filling)
    result = train(RECIPE, "model.channels=8", "model.inner_channels=16", "data.limit_train=64",
                   "data.batch_size=32", "train.log_every=1", "train.max_steps=2",
                   "--out", str(out))
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and "Traceback" not in result.output
    assert (out / "metrics.jsonl").read_text().endswith("}\n") and len(rows(out)) == 1


# --- further cases found along the way ------------------------------------------------------


def test_an_override_of_an_aliased_block_changes_only_that_block(tmp_path):
    path = tmp_path / "shared.yaml"
    path.write_text("deq:\n  forward: &solve {solver: anderson, tol: 1.0e-3}\n"
                    "  backward: {mode: ift, tol: 1.0e-4}\n  eval: *solve\n")
    r = recipes.load(path, ["deq.forward.tol=1e-5"])
    assert r.deq.forward.tol == 1e-5 and r.deq.eval.tol == 1e-3


def test_a_metrics_file_or_meta_that_is_a_device_is_refused(run, tmp_path):
    endless = tmp_path / "run"
    shutil.copytree(run, endless)
    (endless / "metrics.jsonl").unlink()
    (endless / "metrics.jsonl").symlink_to("/dev/zero")
    assert "not a regular file" in one_line_exit_2(runner.invoke(app, ["compare", str(endless)]))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "final", ckpt)
    (ckpt / "meta.json").unlink()
    (ckpt / "meta.json").symlink_to("/dev/zero")
    assert "not a regular file" in one_line_exit_2(runner.invoke(app, ["eval", str(ckpt)]))


def test_a_lone_npy_is_one_line(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 3), np.float32))
    assert "not a readable .npz" in one_line_exit_2(npz_train(path, tmp_path))


def test_a_stored_description_that_fits_no_model_is_a_checkpoint_error(run, tmp_path):
    bad = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "final", bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["data_info"].update(task="lm", inputs="tokens", shape=[16], tokenizer="byte")
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(deqctl.CheckpointError, match="takes image inputs"):
        deqctl.load(bad)


# --- a second probe: files a sent run may hold, odd names and numbers ----------------------


def _copy(run: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    return bad


@pytest.mark.parametrize("entry", [".lock", "metrics.jsonl", "checkpoints",
                                   "checkpoints/final/trainer.json"])
def test_a_run_whose_files_are_symlinks_is_never_resumed(run, tmp_path, entry):
    """A resume would write, trim or set aside whatever the links point at."""
    bad = _copy(run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    target = bad / entry
    if target.is_dir():
        shutil.move(target, elsewhere)
    else:
        elsewhere.write_bytes(target.read_bytes() if target.exists() else b"precious\n")
        target.unlink(missing_ok=True)
    target.symlink_to(elsewhere)
    before = _contents(tmp_path)
    line = one_line_exit_2(train("--resume", str(bad), "train.max_steps=4"))
    assert "symlink" in line
    assert _contents(tmp_path) == before


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_fifos_in_a_checkpoint_never_block(run, tmp_path):
    bad = _copy(run, tmp_path)
    final = bad / "checkpoints" / "final"
    (final / "trainer.safetensors").unlink()
    os.mkfifo(final / "trainer.safetensors")
    line = one_line_exit_2(_never_blocks(lambda: train("--resume", str(bad),
                                                       "train.max_steps=4")))
    assert "trainer.safetensors" in line
    (final / "model.safetensors").unlink()
    os.mkfifo(final / "model.safetensors")
    line = one_line_exit_2(_never_blocks(lambda: runner.invoke(app, ["eval", str(final)])))
    assert "not a run directory or checkpoint" in line


@pytest.mark.parametrize("content", [
    '{"pid": true, "host": "x", "started": 1}', '{"pid": 99999999999, "host": "x", "started": 1}',
    '{"pid": 1, "host": "' + "h" * 5000 + '", "started": 1}', "[" * 50000, "\0\1\2 not json",
    "A-LIVE-PROCESS",
])
def test_a_crafted_lock_never_blocks_a_reader_or_a_resume(run, tmp_path, content):
    """Nobody holds the flock, so whatever the lock says, nobody writes the run: even a
    lock naming a live process on this host (pid 1)."""
    bad = _copy(run, tmp_path)
    if content == "A-LIVE-PROCESS":
        import socket
        content = json.dumps({"pid": 1, "host": socket.gethostname(), "started": time.time()})
    (bad / ".lock").write_text(content)
    result = runner.invoke(app, ["eval", str(bad)])
    assert result.exit_code == 0 and "still being trained" not in result.output, result.output
    result = train("--resume", str(bad), "train.max_steps=3")
    assert result.exit_code == 0, result.output
    assert max(r["step"] for r in rows(bad)) == 3


def test_a_folder_holding_only_a_lock_is_a_free_out(tmp_path):
    """A run killed before its first write leaves only .lock behind."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("{}")
    result = train(RECIPE, "model.channels=8", "model.inner_channels=16", "train.max_steps=1",
                   "data.limit_train=32", "data.limit_eval=32", "data.batch_size=32",
                   "--out", str(out))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("change, says", [
    ({"step": 1, "row_start": 1}, "its step 1 is not the checkpoint's (2)"),
    ({"pos": 1}, "are not step 2"),
    ({"logged": ["train", "holdout"]}, "logged holds splits"),
    ({"logged": ["train", "val"]}, "final evaluation is recorded in one file"),
    ({"pending": [[{"loss": 1.0}]]}, "each with its n"),
    ({"pending": [[{"loss": 1e999, "n": 1}]]}, "rows of numbers"),
])
def test_a_trainer_state_that_contradicts_its_checkpoint_is_refused(run, tmp_path, change,
                                                                     says):
    """An edited step would set aside the checkpoint itself and drop the run's rows; a
    final evaluation said not to be logged would be logged twice."""
    bad = _copy(run, tmp_path)
    ckpt = bad / "checkpoints" / "final"
    state = json.loads((ckpt / "trainer.json").read_text())
    state["state"].update(change)
    (ckpt / "trainer.json").write_text(json.dumps(state))
    before = sorted(str(p) for p in bad.rglob("*"))
    metrics = rows(bad)
    line = one_line_exit_2(train("--resume", str(bad)))
    assert says in line, line
    assert rows(bad) == metrics and sorted(str(p) for p in bad.rglob("*")) == before


@pytest.mark.parametrize("damage", ["lr", "betas", "amsgrad", "shape", "nan"])
def test_a_tampered_optimizer_state_is_refused_before_a_step(run, tmp_path, damage):
    bad = _copy(run, tmp_path)
    ckpt = bad / "checkpoints" / "final"
    state = json.loads((ckpt / "trainer.json").read_text())
    group = state["optimizer"]["param_groups"][0]
    tensors = load_file(ckpt / "trainer.safetensors")
    avg = next(k for k in tensors if k.endswith("exp_avg"))
    if damage == "lr":
        group["lr"] = "fast"
    elif damage == "betas":
        group["betas"] = [0.9]
    elif damage == "amsgrad":
        group["amsgrad"] = not group["amsgrad"]
    elif damage == "shape":
        tensors[avg] = torch.zeros(3)
    else:
        tensors[avg] = torch.full_like(tensors[avg], float("nan"))
    (ckpt / "trainer.json").write_text(json.dumps(state))
    save_file(tensors, str(ckpt / "trainer.safetensors"))
    line = one_line_exit_2(train("--resume", str(bad), "train.max_steps=4"))
    assert "optimizer" in line and "trainer" in line


@pytest.mark.parametrize("change, says", [
    ({"mean": [0.1, 0.2]}, "mean has 2 values for 1 channel"),
    ({"std": [0.0]}, "std holds values <= 0"),
    ({"task": "classify", "num_classes": None}, "needs num_classes"),
])
def test_a_data_description_that_contradicts_itself_is_a_checkpoint_error(run, tmp_path,
                                                                           change, says):
    bad = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "final", bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["data_info"].update(change)
    (bad / "meta.json").write_text(json.dumps(meta))
    assert says in one_line_exit_2(runner.invoke(app, ["eval", str(bad)]))
    with pytest.raises(deqctl.CheckpointError, match=says):
        deqctl.load(bad)


def test_a_plain_safetensors_file_is_not_taken_for_its_folder_s_checkpoint(run, tmp_path):
    """Naming one file must not open the checkpoint beside it (other weights)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "final", ckpt)
    plain = ckpt / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    assert "without deqctl's metadata" in one_line_exit_2(runner.invoke(app, ["eval", str(plain)]))


def test_an_npz_member_without_the_npy_suffix_is_counted(tmp_path):
    """numpy loads a member named `x` as key x: its size is checked like x.npy's."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for name, shape in (("x", (10**6, 1000, 1000)), ("y.npy", (10**6,))):
            with zf.open(name, "w") as fh:
                np.lib.format.write_array_header_1_0(
                    fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
                fh.write(b"\0" * 16)
    assert "x alone is" in one_line_exit_2(npz_train(path, tmp_path))


def test_values_beyond_float32_are_bad_data(tmp_path):
    x = np.random.rand(16, 12, 1)
    x[2, 3, 0] = 1e39                          # finite in float64, inf in training
    y = np.arange(16) % 2
    path = _npz(tmp_path / "d.npz", x=x, y=y, x_test=x[:4], y_test=y[:4])
    result = train(str(Path(RECIPE).parent / "sequential-mnist-deq.yaml"), "data.name=npz",
                   f"data.path={path}", "train.max_steps=1", "--out", str(tmp_path / "run"))
    assert "beyond float32 (1 value(s), the first at index (2, 3, 0))" in one_line_exit_2(result)
    csv = tmp_path / "s.csv"
    csv.write_text("t,v\n1,1.0\n2,1e39\n3,2.0\n")
    result = train(str(Path(RECIPE).parent / "co2-forecast-deq.yaml"), "data.name=csv",
                   f"data.path={csv}", "data.time_column=t", "data.columns=[v]",
                   "train.max_steps=1", "--out", str(tmp_path / "run2"))
    assert "line 3: v = '1e39' is not a finite float32 number" in one_line_exit_2(result)


def test_an_image_bomb_is_refused_from_its_header(tmp_path):
    """A PNG of a few bytes whose header declares 10000 x 10000 pixels: past PIL's warning
    limit (~89M pixels), below its error limit, so PIL alone would decode it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    _digits(tmp_path / "imgs")
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000,
                                                                8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    (tmp_path / "imgs" / "train" / "a" / "bomb.png").write_bytes(png)
    result = train(RECIPE, "data.name=imagefolder", f"data.root={tmp_path / 'imgs'}",
                   "model.channels=8", "model.inner_channels=16", "train.max_steps=1",
                   "--out", str(tmp_path / "run"))
    assert "bomb.png: an image of more than" in one_line_exit_2(result)


@pytest.mark.parametrize("args, says", [
    (["compare", "RUN", "--target", "nan"], "--target"),
    (["eval", "RUN", "--sweep-iters", "\u00b2"], "--sweep-iters"),
    (["solve-trace", "RUN", "--tol", "inf"], "--tol must be a finite number"),
    (["eval", "/tmp/" + "a" * 5000], "File name too long"),
    (["eval", "TMP/no\nerror: forged"], "no such run directory"),
    (["solve-trace", "TMP/m.safetensors", "--json", "TMP/m.safetensors", "--force"],
     "which this command reads"),
    (["solve-trace", "RUN", "--plot", "TMP/x.json", "--json", "TMP/x.json"], "both name"),
    (["export", "RUN", "--format", "safetensors", "--out", "TMP/fifo", "--force"],
     "not a regular file"),
])
def test_odd_arguments_are_one_line(run, tmp_path, args, says):
    _export(run, tmp_path)
    os.mkfifo(tmp_path / "fifo")
    args = [str(run) if a == "RUN" else a.replace("TMP", str(tmp_path)) for a in args]
    assert says in one_line_exit_2(runner.invoke(app, args))
    assert stat_kind(tmp_path / "fifo") == "fifo" and (tmp_path / "m.safetensors").stat().st_size


def stat_kind(path: Path) -> str:
    import stat
    return "fifo" if stat.S_ISFIFO(os.lstat(path).st_mode) else "other"


def test_a_recipe_that_is_not_a_mapping_is_one_line(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- eval\n")
    assert "mapping" in one_line_exit_2(train(str(path), "optim.lr=1e-3"))
