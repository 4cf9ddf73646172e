"""Every command the README and the docs/ pages show runs in a test.

The commands are read from README.md and docs/*.md (together "the README" below: a command
that moves from one page to another stays tested) when the tests are collected: the
`deqctl ...` lines of their fenced code blocks (continuation lines joined, `# comments` dropped, `a && b` split)
and its inline `deqctl ...` spans, including `.venv/bin/deqctl ...` and `torchrun ... -m
deqctl ...`. A usage synopsis (a `[optional]` or `a|b` token) is skipped; a command that
cannot run here is in EXEMPT, with its reason; every other one runs as written, in a
folder of its own holding what its placeholders name (RUN: a trained run; my.npz,
load.csv, OTHER.txt, DIR: data files of the right kind; tanh_deq.py: the README's own
file; runs/deq, runs/twin, runs/tanh: the runs the README's own commands train), with
only small-step overrides appended. A command added to the README later gets its own
test, and that test fails when nothing here knows how to run it.

Last, every shipped recipe moves to every local data source of its kind by `data.*`
overrides alone, as the README promises.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from deqctl.cli import app

from cli_helpers import CONFIGS, runner, tiny

REPO = Path(__file__).parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"


def readme_text() -> str:
    """The README and every docs/ page, each page's code spans and blocks kept to itself."""
    pages = [README, *sorted(DOCS.glob("*.md"))]
    return "\n\n".join(page.read_text(encoding="utf-8") for page in pages)


pytestmark = pytest.mark.usefixtures("one_thread")

# Commands the README or a docs/ page shows that cannot run here, with the reason (each is
# a skipped test case saying so; whitespace as " ".join(command.split())). An entry no
# longer in any of them fails test_every_exemption_is_still_in_the_readme.
EXEMPT = {
    # WikiText-2 from the Hugging Face hub (the hf source reading a save_to_disk folder
    # offline is tested in tests/test_sources.py)
    "deqctl train configs/shakespeare-deq.yaml data.name=hf data.hf.path=wikitext "
    "data.hf.config=wikitext-2-raw-v1 data.hf.val_split=validation":
        "downloads from the Hugging Face hub: no internet here",
    # two machines (8 processes each) meeting at HOST:29400, writing to /shared (the
    # one-machine torchrun commands beside it do run)
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29400 "
    "--rdzv_id=deq-1 -m deqctl train RECIPE.yaml --out /shared/runs/ddp":
        "multi-node torchrun with a rendezvous endpoint: one machine here",
    # a command's name in a heading or in prose, not a command line
    "deqctl solve-trace": "a command's name in prose (no arguments), not a command line",
    "deqctl compare": "a command's name in a heading, not a command line",
    "deqctl eval": "a command's name in a heading, not a command line",
    "deqctl export": "a command's name in a heading, not a command line",
    "deqctl predict": "a command's name in a heading, not a command line",
    "deqctl generate": "a command's name in a heading, not a command line",
    "deqctl sweep": "a command's name in a heading, not a command line",
    "deqctl train": "a command's name in prose (no arguments), not a command line",
    # a point of a sweep, NAME standing for its folder, in prose
    "deqctl train --resume sweeps/lr/NAME": "NAME is a placeholder for a point's folder",
}

# Placeholders for values (not files): each filling is a test case of its own.
VALUES = {"runtime.precision=P": ["runtime.precision=fp32", "runtime.precision=fp16",
                                  "runtime.precision=bf16"]}      # the README's precisions

# Small-step overrides of the model of each recipe a README command trains (the data and
# step overrides come from cli_helpers.tiny()); a recipe missing here fails its test. The
# data switches below use them too, where there are any.
SMALL_MODEL = {
    "mnist-deq": [o for o in tiny() if o.startswith("model.")],
    "cifar10-mdeq": ["model.channels=[8,16]", "model.groups=4", "model.head_width=16"],
    "imagenet-mdeq": ["model.channels=[8,16]", "model.groups=4", "model.head_width=16"],
    "sequential-mnist-deq": ["model.d_model=16", "model.heads=2", "model.d_ff=32"],
    "shakespeare-deq": ["model.d_model=16", "model.heads=2", "model.d_ff=32"],
    "co2-forecast-deq": ["model.d_model=8", "model.heads=2", "model.d_ff=16"],
    "wikitext103-deq": ["model.d_model=16", "model.heads=2", "model.d_ff=32",
                        "model.adaptive.cutoffs=[4,8]"],
}
SMALL_DATA = {"shakespeare-deq": ["data.seq_len=32"], "wikitext103-deq": ["data.seq_len=16"]}


# --- the commands, read from the README ---------------------------------------------------

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
# deqctl as a command word: `deqctl train`, `.venv/bin/deqctl train`, `-m deqctl train`,
# `"$(which deqctl)" train` (not `import deqctl` or `deqctl.load`)
COMMAND = re.compile(r"(?:^|(?<=[\s/\"]))deqctl\)?\"?[ \t]+\S")


def _squash(text: str) -> str:
    return " ".join(text.split())


def _split_comment(line: str) -> tuple[str, str]:
    """The line and its shell comment (from a # at its start or after whitespace, unquoted)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:]
    return line, ""


def _alternative(command: str, comment: str) -> str | None:
    """`CMD --opt value   # or --flag` also shows CMD with its last option replaced by --flag."""
    match = re.fullmatch(r"\s*or\s+(--[\w-]+)\s*", comment)
    if not match:
        return None
    tokens = command.split()
    last = max(i for i, t in enumerate(tokens) if t.startswith("--"))
    takes_value = last + 1 < len(tokens) and not tokens[last + 1].startswith("-")
    return " ".join([*tokens[:last], *tokens[last + 1 + takes_value:], match.group(1)])


def readme_commands(text: str) -> list[str]:
    """Every deqctl command the README shows, in order, each once (whitespace squashed)."""
    found: list[str] = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            code, comment = _split_comment(line)
            for part in code.split("&&"):
                if COMMAND.search(part):
                    found.append(_squash(part))
                    if _alternative(found[-1], comment):
                        found.append(_alternative(found[-1], comment))
    prose = FENCE.sub("", text)
    for span in re.findall(r"`([^`]+)`", prose):
        if "\n\n" not in span and re.match(r"(\S*/)?deqctl\s+\S", span.strip()):
            found.append(_squash(span))
    return list(dict.fromkeys(found))


def is_synopsis(command: str) -> bool:
    """A usage line: an [optional] part or a|b alternatives."""
    return any(token.startswith("[") or "|" in token for token in command.split())


@dataclass(frozen=True)
class Case:
    command: str           # as the README shows it (whitespace squashed)
    text: str              # after value placeholders are filled in

    @property
    def tokens(self) -> list[str]:
        return shlex.split(self.text)

    @property
    def torchrun(self) -> bool:
        return self.tokens[0] == "torchrun"

    @property
    def argv(self) -> list[str]:
        """The arguments deqctl gets (after the launcher)."""
        tokens = self.tokens
        if ">" in tokens:                      # `... > FILE`: the shell's, not deqctl's
            tokens = tokens[:tokens.index(">")]
        for i, token in enumerate(tokens):
            if token == "deqctl" or token.endswith("/deqctl") or token == "$(which deqctl)":
                return tokens[i + 1:]
        raise AssertionError(f"no deqctl in {self.text!r}")

    @property
    def redirect(self) -> str | None:
        """The file `> FILE` sends stdout to, or None."""
        tokens = self.tokens
        return tokens[tokens.index(">") + 1] if ">" in tokens[:-1] else None

    @property
    def sub(self) -> str:
        return self.argv[0]

    def option(self, name: str) -> str | None:
        argv = self.argv
        return argv[argv.index(name) + 1] if name in argv[:-1] else None


def cases(text: str) -> list:
    """One test case per README command; usage lines and exemptions are skipped cases."""
    out = []
    for command in readme_commands(text):
        skip = "a usage synopsis" if is_synopsis(command) else EXEMPT.get(command)
        if skip:
            out.append(pytest.param(Case(command, command), id=command,
                                    marks=pytest.mark.skip(reason=skip)))
            continue
        fills = [(k, v) for k in VALUES for v in VALUES[k] if k in command.split()]
        for key, value in fills or [(None, None)]:
            filled = command if key is None else command.replace(key, value)
            label = command if key is None else f"{command} [{value}]"
            out.append(pytest.param(Case(command, filled), id=label))
    return out


CASES = cases(readme_text())
RUNNABLE = [p.values[0] for p in CASES if not p.marks]


# --- the files the commands name ----------------------------------------------------------


def readme_model() -> str:
    """The README's complete model file (the code block after 'saved as `tanh_deq.py`')."""
    section = README.read_text(encoding="utf-8").split("saved as `tanh_deq.py`", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _images(root: Path, size: int = 8) -> None:
    """An image folder: train/ and test/ with two classes of grey PNGs."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for part, n in (("train", 8), ("test", 4)):
        for label, cls in enumerate(("a", "b")):
            (root / part / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (size, size)) + 150 * label
                Image.fromarray(pixels.astype(np.uint8)).save(root / part / cls / f"{i}.png")


def write_inputs(folder: Path) -> Path:
    """What the README's commands and the data switches read, written once."""
    rng = np.random.default_rng(0)
    shutil.copytree(CONFIGS, folder / "configs")          # relative configs/... paths
    (folder / "tanh_deq.py").write_text(readme_model())
    # my.npz: sequences (N, L, C) with class labels, as sequential-mnist-deq reads them
    x = rng.normal(size=(48, 12, 3)).astype(np.float32)
    y = (x[:, :, 0].mean(1) > 0).astype(np.int64)
    np.savez(folder / "my.npz", x=x[:32], y=y[:32], x_test=x[32:], y_test=y[32:])
    # images.npz: float images (N, C, H, W) in [0, 1] with class labels
    y = rng.integers(0, 3, 48)
    x = (rng.random((48, 1, 12, 12)) * 0.3 + 0.3 * y[:, None, None, None]).astype(np.float32)
    np.savez(folder / "images.npz", x=x[:32], y=y[:32], x_test=x[32:], y_test=y[32:])
    # forecast.npz: sequences (N, L, C) and float values to predict (N, H, C)
    t = np.arange(48)[:, None] + np.arange(30)[None, :]
    series = np.stack([np.sin(t / 3.0), np.cos(t / 5.0)], -1).astype(np.float32)
    np.savez(folder / "forecast.npz", x=series[:32, :24], y=series[:32, 24:],
             x_test=series[32:, :24], y_test=series[32:, 24:])
    # load.csv: hourly rows with the README's columns (when, load, temp)
    lines = ["when,load,temp"] + [
        f"2020-01-{1 + i // 24:02d}T{i % 24:02d}:00,{50 + 10 * np.sin(i / 3.8):.3f},"
        f"{20 + 5 * np.cos(i / 24 * 2 * np.pi):.3f}" for i in range(480)]
    (folder / "load.csv").write_text("\n".join(lines) + "\n")
    # text files: one to train on, one to test on, and OTHER.txt with characters unseen
    words = "to be or not to be that is the question whether tis nobler in the mind "
    (folder / "train.txt").write_text(words * 40, encoding="utf-8")
    (folder / "test.txt").write_text(words[::-1] * 10, encoding="utf-8")
    (folder / "OTHER.txt").write_text("Ye shall know them ~~ 12345 \u00e9\u00e9 " * 10,
                                      encoding="utf-8")
    _images(folder / "DIR")                                   # the README's data.root=DIR
    # weekly.csv: two and a half years of weekly values, as co2.csv holds them
    week = np.datetime64("2000-01-01") + 7 * np.arange(130)
    (folder / "weekly.csv").write_text("date,co2\n" + "".join(
        f"{d},{370 + 3 * np.sin(i / 8.3):.2f}\n" for i, d in enumerate(week)))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("readme-inputs"))


def workdir(folder: Path, inputs: Path) -> Path:
    shutil.copytree(inputs, folder, dirs_exist_ok=True)
    return folder


def small(recipe: str, argv: list[str]) -> list[str]:
    """Small-step overrides for training `recipe`, leaving the keys the command sets."""
    stem = Path(recipe).stem
    assert stem in SMALL_MODEL, f"{recipe}: add its small model overrides to SMALL_MODEL"
    given = {a.split("=", 1)[0] for a in argv if "=" in a and not a.startswith("-")}
    model = [] if "model.name" in given else SMALL_MODEL[stem]
    extra = [o for o in tiny() if not o.startswith("model.")] + ["train.max_steps=2"]
    return [o for o in [*model, *SMALL_DATA.get(stem, []), *extra]
            if o.split("=", 1)[0] not in given]


# --- the runs the commands read -----------------------------------------------------------


def _train_small(out: Path, recipe: str, *overrides: str) -> Path:
    result = runner.invoke(app, ["train", str(CONFIGS / recipe), *overrides,
                                 *small(recipe, list(overrides)), "--out", str(out), "--plain"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    """A 2-step character language model (what `eval RUN data.name=text` needs)."""
    return _train_small(tmp_path_factory.mktemp("readme-lm") / "run", "shakespeare-deq.yaml",
                        "data.limit_eval=16")


@pytest.fixture(scope="module")
def forecast_run(tmp_path_factory) -> Path:
    """A 2-step CO2 forecaster (what `predict RUN weekly.csv` needs)."""
    return _train_small(tmp_path_factory.mktemp("readme-fc") / "run", "co2-forecast-deq.yaml",
                        "data.limit_eval=16")


def run_for(case: Case) -> str:
    """Which trained run the placeholder RUN stands for in this command."""
    if "data.name=text" in case.argv or case.sub == "generate":
        return "lm_run"
    if case.sub == "predict" and any(a.endswith(".csv") and a != case.option("--out")
                                     for a in case.argv[2:]):
        return "forecast_run"
    return "run"


@dataclass
class Done:
    result: object
    cwd: Path


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory, inputs):
    """The README's own `train ... --out runs/NAME` commands, each run once (in a folder
    of its own): their tests check them, and the commands that read runs/NAME copy them."""
    done: dict[str, Done] = {}

    def train(case: Case) -> Done:
        if case.text not in done:
            cwd = workdir(tmp_path_factory.mktemp("readme-train"), inputs)
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(cwd)
                done[case.text] = Done(run_deqctl(case), cwd)
        return done[case.text]

    def produce(name: str, into: Path) -> None:
        makers = [c for c in RUNNABLE if c.sub in ("train", "sweep") and c.option("--out") == name
                  and "--print-commands" not in c.argv]
        assert makers, f"{name}: no README command trains it (add one, or a fixture here)"
        made = train(makers[0])
        assert made.result.exit_code == 0, made.result.output
        shutil.copytree(made.cwd / name, into / name)

    return train, produce


def run_deqctl(case: Case):
    """Run a deqctl command in-process in the current folder, small-step overrides added."""
    argv = list(case.argv)
    if case.sub in ("train", "sweep"):
        argv += small(argv[1], argv[1:]) + ["--plain"]
    elif case.sub == "solve-trace" and argv[1].endswith((".yaml", ".yml")):
        argv += small(argv[1], argv[1:])              # an untrained model from a recipe
    return runner.invoke(app, argv)


# --- what each command leaves behind ------------------------------------------------------


def _is_run(folder: Path) -> None:
    assert (folder / "recipe.yaml").is_file() and (folder / "metrics.jsonl").is_file(), folder
    assert (folder / "checkpoints" / "final" / "model.safetensors").is_file(), folder
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "train" for r in rows) and rows[-1]["split"] == "test", rows[-1]


def check_outputs(case: Case, result, cwd: Path) -> None:
    assert result.exit_code == 0, f"{case.text}\n{result.output}"
    sub, argv = case.sub, case.argv
    if sub == "train":
        out = case.option("--out")
        if out is None:                       # the default: runs/NAME-TIME
            made = [p for p in (cwd / "runs").iterdir() if p.is_dir()]
            assert len(made) == 1, made
            out = made[0]
        _is_run(cwd / out)
    elif sub == "eval":
        if "--json" in argv:
            report = json.loads(result.stdout)
            assert report["n"] > 0 and "loss" in report, report
        if "--sweep-iters" in argv:
            iters = [int(k) for k in case.option("--sweep-iters").split(",")]
            assert all(re.search(rf"^\s*\S?\s*{k}\b", result.output, re.M) for k in iters), \
                result.output
        assert "loss" in result.output
        solver = next((a.split("=", 1)[1] for a in argv if a.startswith("deq.eval.solver=")), None)
        if solver and "--json" not in argv:
            assert f"eval solver {solver}," in result.output, result.output
        if "data.name=text" in argv:         # OTHER.txt holds characters training never saw
            assert "not in the training vocabulary" in result.output, result.output
    elif sub == "solve-trace":
        assert "spectral radius of df/dz" in result.output, result.output
        for option in ("--plot", "--json"):
            if case.option(option):
                assert (cwd / case.option(option)).stat().st_size > 0, option
    elif sub == "export":
        assert (cwd / case.option("--out")).stat().st_size > 0
        if case.option("--format") != "safetensors":
            assert "parity ok" in result.output, result.output
    elif sub == "compare":
        if case.option("--plot"):
            assert (cwd / case.option("--plot")).stat().st_size > 0
        if any(a.startswith("sweeps/") for a in argv):      # a sweep: its groups over seeds
            assert "paired over seeds" in result.output, result.output
        if "--json" in argv:
            report = json.loads(result.stdout)
            runs = [a for a in argv[1:] if a.startswith("runs/")]
            assert [r["path"] for r in report["runs"]] == runs, report
    elif sub == "predict":
        lines = (cwd / case.option("--out")).read_text().splitlines() if case.option("--out") \
            else result.stdout.splitlines()
        rows = [json.loads(line) for line in lines] if "--json" in argv or \
            (case.option("--out") or "").endswith(".jsonl") else list(csv.DictReader(lines))
        assert rows and all(r["nfe"] for r in rows), result.output
        series = any(a.endswith(".csv") and a != case.option("--out") for a in argv[2:])
        assert ("time" in rows[0]) == series, rows[0]      # a forecast's rows are dated
        if case.option("--top-k"):
            assert f"prediction_{case.option('--top-k')}" in rows[0], rows[0]
    elif sub == "generate":
        if "--json" in argv:
            report = json.loads(result.stdout)
            assert len(report["tokens"]) == int(case.option("--tokens")), report["summary"]
            assert report["reuse"] == ("--no-reuse" not in argv)
        else:
            assert result.stdout.startswith(case.option("--prompt")) and \
                f"{case.option('--tokens')} tokens in" in result.stderr, result.output
    elif sub == "sweep":
        plan = json.loads((cwd / case.option("--out") / "sweep.json").read_text())
        if "--print-commands" in argv:
            lines = result.stdout.splitlines()
            assert len(lines) == len(plan["points"]) and all(
                line.startswith("deqctl train ") for line in lines), result.stdout
        else:
            assert {p["status"] for p in plan["points"]} == {"finished"}, plan["points"]
            for p in plan["points"]:
                _is_run(cwd / case.option("--out") / p["name"])
    elif sub == "data":
        assert re.search(r"^model \S+: [\d,]+ parameters", result.output, re.M), result.output
        assert re.search(r"^  test +[\d,]+ samples", result.output, re.M), result.output
        if "data.tokenizer=bpe" in argv:
            assert "vocabulary: bpe, 1,000 ids" in result.output, result.output
    elif sub == "--version":
        assert re.fullmatch(r"deqctl \d+\.\d+\.\d+\S*\n", result.output), result.output
    else:
        pytest.fail(f"{case.text}: no check for `deqctl {sub}` here; add one")


# --- torchrun ---------------------------------------------------------------------------


@dataclass
class Finished:
    exit_code: int
    output: str
    stdout: str


def torchrun(case: Case, cwd: Path) -> Finished:
    """A torchrun command as written (through bash, so $(which deqctl) is expanded), the
    venv's scripts first on PATH."""
    argv = case.argv
    extra = small(argv[1], argv[1:]) + ["--plain"]
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": bindir + os.pathsep + os.environ["PATH"]}
    done = subprocess.run(["bash", "-c", f"{case.text} {shlex.join(extra)}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return Finished(done.returncode, done.stdout + done.stderr, done.stdout)


# --- the tests ------------------------------------------------------------------------------


def test_the_readme_shows_the_commands_this_file_runs():
    """The parser finds the README's commands: if this fails, it stopped finding them."""
    commands = readme_commands(readme_text())
    subs = {Case(c, c).sub for c in commands if not is_synopsis(c) and c not in EXEMPT}
    assert {"train", "eval", "solve-trace", "export", "compare", "predict",
            "generate", "sweep"} <= subs, commands
    assert any(c.startswith(".venv/bin/deqctl ") for c in commands)
    assert sum(c.startswith("torchrun ") for c in commands) >= 2
    assert sum(is_synopsis(c) for c in commands) >= 5          # the usage lines


def test_every_exemption_is_still_in_the_readme():
    commands = readme_commands(readme_text())
    assert not set(EXEMPT) - set(commands), set(EXEMPT) - set(commands)


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_docs_page_is_linked_and_every_relative_link_resolves():
    """The README links each docs/ page, and a page moved or a heading renamed breaks no
    link: every relative `](target#anchor)` names a file that exists and a heading in it."""
    readme = README.read_text(encoding="utf-8")
    unlinked = [p.name for p in DOCS.glob("*.md") if f"](docs/{p.name})" not in readme]
    assert not unlinked, f"README's Documentation list lacks {unlinked}"
    broken = []
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        prose = FENCE.sub("", page.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):                    # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            headings = re.findall(r"^#+\s+(.*)$", FENCE.sub("", dest.read_text(
                encoding="utf-8")), re.M) if dest.suffix == ".md" and dest.is_file() else []
            if not dest.exists() or (anchor and anchor not in map(_anchor, headings)):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


@pytest.mark.parametrize("case", CASES)
def test_readme_command(case: Case, tmp_path, monkeypatch, request, inputs, readme_runs):
    train, produce = readme_runs
    workdir(tmp_path, inputs)
    monkeypatch.chdir(tmp_path)
    argv = case.argv
    if case.tokens[0].endswith("/deqctl"):      # .venv/bin/deqctl: the script runs this app
        (script,) = importlib.metadata.entry_points(group="console_scripts", name="deqctl")
        assert script.value == "deqctl.cli:main"
    if "RUN" in argv:
        shutil.copytree(request.getfixturevalue(run_for(case)), tmp_path / "RUN")
    for name in argv[1:] if case.sub not in ("train", "sweep") else ():
        if name.startswith(("runs/", "sweeps/")):
            produce(name, tmp_path)
    if case.torchrun:
        result = torchrun(case, tmp_path)
        assert result.output.count("done: ") == 1, result.output   # rank 0 speaks for all
    elif case.sub in ("train", "sweep") and (case.option("--out") or "").startswith(
            ("runs/", "sweeps/")) and "--print-commands" not in argv:
        made = train(case)                  # shared with the commands that read it
        result, tmp_path = made.result, made.cwd
    else:
        result = run_deqctl(case)
    if case.redirect:
        (tmp_path / case.redirect).write_text(result.stdout)
    check_outputs(case, result, tmp_path)


# --- a recipe moves to other data of its kind by data.* overrides alone --------------------

# The kind of data each built-in source gives, and the local sources of each kind with the
# data.* overrides that point them at the files write_inputs() makes. hf is left out: it
# needs the hub or a save_to_disk folder (tests/test_sources.py).
KIND = {"mnist-5k": "image", "mnist": "image", "fashion-mnist": "image", "cifar10": "image",
        "imagefolder": "image", "sequential-mnist": "sequence", "shakespeare": "text",
        "text": "text", "hf": "text", "co2": "series", "csv": "series",
        "prefix-sums": "algorithmic", "mazes": "algorithmic"}
LOCAL = {
    "image": {"npz": ["data.name=npz", "data.path=images.npz"],
              "imagefolder": ["data.name=imagefolder", "data.root=DIR"]},
    "sequence": {"npz": ["data.name=npz", "data.path=my.npz"]},
    "text": {"text": ["data.name=text", "data.files.train=train.txt",
                      "data.files.test=test.txt"]},
    "series": {"csv": ["data.name=csv", "data.path=load.csv", "data.time_column=when",
                       "data.columns=[load,temp]"],
               "npz": ["data.name=npz", "data.path=forecast.npz"]},
    "algorithmic": {},         # generated: no file of this kind to move to
}


def _switches() -> list:
    out = []
    for recipe in sorted(CONFIGS.glob("*.yaml")):
        source = (yaml.safe_load(recipe.read_text()).get("data") or {}).get("name", "mnist-5k")
        kind = KIND.get(source)
        if kind is None:
            out.append(pytest.param(recipe.name, None, source, None, id=f"{recipe.name}->?"))
            continue
        for name, overrides in LOCAL[kind].items():
            out.append(pytest.param(recipe.name, kind, name, overrides,
                                    id=f"{recipe.name}->{name}"))
    return out


@pytest.mark.parametrize("recipe, kind, source, overrides", _switches())
def test_a_shipped_recipe_moves_to_local_data_of_its_kind_by_data_overrides_alone(
        recipe, kind, source, overrides, tmp_path, monkeypatch, inputs):
    """Switching data.name drops what suited the old source: sequential-mnist-deq's
    `augment: true` once survived onto an npz of sequences and stopped the run with
    "data.augment: shifts apply to images; this x holds sequences"."""
    assert kind is not None, f"{recipe}: its data.name={source} has no kind in KIND here"
    workdir(tmp_path, inputs)
    monkeypatch.chdir(tmp_path)
    steps = [o for o in tiny() if o.startswith(("data.", "train.", "runtime."))]
    model = SMALL_MODEL.get(Path(recipe).stem, [])
    result = runner.invoke(app, ["train", f"configs/{recipe}", *overrides, *steps,
                                 "train.max_steps=2", *model, "--out", "run", "--plain"])
    assert result.exit_code == 0, result.output
    _is_run(tmp_path / "run")
    stored = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]
    assert stored["name"] == source
    if kind != "image":                            # shifts mean nothing to other data
        assert not stored.get("augment"), stored
