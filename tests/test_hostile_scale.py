"""Hostile tests of the newest surfaces (issues 30 and 31): tokenizers and token caches at
scale, `deqctl data`, progress output, errors raised in user code, image folders. Each test
pins a failure found by trying to break them; the finding's number is in its comment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deqctl import recipe as recipes
from deqctl.data import build_data
from deqctl.data import tokenize

from cli_helpers import RECIPE, tiny, train

pytestmark = pytest.mark.usefixtures("one_thread")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TEXT = "".join(f"line {i} of the corpus, with words e{i % 7}\n" for i in range(200))


def text_data(tmp_path: Path, **kw):
    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "test.txt").write_text(TEXT, encoding="utf-8")
    return recipes.validate({"data": {
        "name": "text", "seq_len": 8, "root": str(tmp_path / "cache"),
        "files": {"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")},
        **kw}}).data


# -- finding 1: a tokenizer.json that carries truncation / padding settings ------------------

@pytest.mark.parametrize("setting", ["truncation", "padding"])
def test_a_tokenizer_file_with_truncation_or_padding_keeps_every_word(tmp_path, setting):
    # Finding 1: HFTokenizer encodes with the file's own truncation and padding (many
    # published tokenizer.json files carry `"truncation": {"max_length": 512}`), so every
    # line is silently cut to max_length ids, or padded with pad ids, in the token file.
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(TEXT.split()))
    hf = Tokenizer(models.WordLevel({"<unk>": 0, "<pad>": 1, **{w: i + 2 for i, w in
                                                                  enumerate(words)}},
                                    unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if setting == "truncation":
        hf.enable_truncation(max_length=2)
    else:
        hf.enable_padding(length=12, pad_id=1, pad_token="<pad>")
    hf.save(str(tmp_path / "tokenizer.json"))
    bundle = build_data(text_data(tmp_path, tokenizer=str(tmp_path / "tokenizer.json")))
    assert bundle.facts["tokens"]["train"] == len(TEXT.split())   # 8 words a line, no pads
    ids = np.asarray(bundle.train.inputs).reshape(-1)
    assert not (ids == 1).any()
    # a checkpoint's data description that still carries them (written before) reads the
    # same, and names other token files than the ones cut then
    stored = tokenize.of("file", hf.to_str())
    assert len(stored.encode(TEXT)) == len(TEXT.split())
    assert stored.stored != hf.to_str() and stored.hf.truncation is stored.hf.padding is None


# -- finding 4: fitting a tokenizer on a text without line ends -----------------------------

FIT = """
import resource, sys
from pathlib import Path
from deqctl.data.tokens import TokenCache, text_file
path = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
TokenCache.at(sys.argv[2]).tokenizer("word", text_file(path, "t"))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_fitting_a_word_tokenizer_on_one_huge_line_takes_bounded_memory(tmp_path):
    # Finding 4: a text with no line end reaches the Hugging Face trainer as 4M-character
    # "lines" (and it buffers 256 of them): fitting `word` on 3 MB grows the peak memory
    # by ~170 MB against ~0 with line ends (bpe: ~330 MB; 8 MB: +550 MB word, +990 MB bpe;
    # 150 MB: +740 MB word).
    text = " ".join(f"w{i % 997}" for i in range(600_000)) + " "
    grown = {}
    for name, body in (("lines", text.replace(" w1 ", " w1\n")), ("one-line", text)):
        (tmp_path / name).write_text(body)
        done = subprocess.run([sys.executable, "-c", FIT, str(tmp_path / name),
                               str(tmp_path / f"cache-{name}")],
                              capture_output=True, text=True, timeout=120, env=ENV)
        assert done.returncode == 0, done.stderr
        grown[name] = int(done.stdout.split()[-1])
    assert grown["one-line"] < grown["lines"] + 32, grown


LONG = ("x  y\tz \t w\u3000v \x1c u, 12 345 'quote' don't " + "q" * 300 + " \r " + "a " * 40
        + "  " * 40 + "end.")


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_a_long_line_is_fitted_and_encoded_in_pieces_that_change_no_id(monkeypatch, kind):
    # Finding 4's fix cuts lines longer than LONGEST_LINE before a space that starts a word;
    # with a short LONGEST_LINE every kind of whitespace run lands next to a cut somewhere.
    lines = [(LONG * 20)[i:] + "\n" for i in range(0, 97, 3)]
    text = "".join(lines)
    settings = {"vocab_size": 400} if kind == "bpe" else {}
    whole = tokenize.train_tokenizer(kind, lines, **settings)
    expected = whole.encode(text).tolist()           # each line whole
    monkeypatch.setattr(tokenize, "LONGEST_LINE", 64)
    assert all(len(list(tokenize._pieces(x))) > 20 for x in lines)
    assert all("".join(tokenize._pieces(x)) == x for x in lines)
    cut = tokenize.train_tokenizer(kind, lines, **settings)
    assert cut.stored == whole.stored                 # the same vocabulary (and merges)
    assert cut.encode(text).tolist() == expected
    if kind == "bpe":
        assert cut.decode(expected) == text


# -- finding 6: an image folder with one class ----------------------------------------------

@pytest.mark.parametrize("empty_class", [False, True])
def test_an_image_folder_with_one_class_is_refused(tmp_path, empty_class):
    # Finding 6: train/ holding a single class folder trains a one-class "classifier"
    # (loss 0, accuracy 100%) without a word; so does a second class folder left empty.
    from PIL import Image

    rng = np.random.default_rng(0)
    if empty_class:
        (tmp_path / "train" / "empty").mkdir(parents=True)
    for part in ("train", "test"):
        (tmp_path / part / "only").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(
                tmp_path / part / "only" / f"{i}.png")
    result = train(RECIPE, "data.name=imagefolder", f"data.root={tmp_path}", *tiny(8, 8),
                   "data.batch_size=8", "data.eval_batch_size=8", "train.max_steps=1",
                   "--out", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "class" in errors[0], result.output


# -- finding 7: a Hugging Face dataset asked for with no network ------------------------------

CACHED = """
import sys
from pathlib import Path
from datasets.data_files import DataFilesDict
from datasets.packaged_modules.text.text import Text
root, src = Path(sys.argv[1]), sys.argv[2]
Text(cache_dir=str(root), dataset_name="deqctl_tiny", hash="0" * 16, data_files=
     DataFilesDict.from_patterns({p: [f"{src}/{p}.txt"] for p in ("train", "test")})
     ).download_and_prepare()
config, = (root / "deqctl_tiny").glob("default-*")   # as the hub's cache names it
config.rename(config.with_name("default"))
"""


def test_a_hub_dataset_offline_fails_in_one_line_without_waiting(tmp_path):
    # Finding 7: with no network, `data.name=hf data.hf.path=NAME` sleeps through the hub
    # client's 5 retries (1+2+4+8+8 s, ~26 s of silence) before its one line; behind a
    # firewall that drops packets each try also waits for its timeout. A dataset in the
    # cache (data.root) waited as long before it was read; a save_to_disk folder never asks.
    from datasets import Dataset, DatasetDict

    text_data(tmp_path)
    lines = TEXT.splitlines(keepends=True)
    DatasetDict({p: Dataset.from_dict({"text": lines}) for p in ("train", "test")}
                ).save_to_disk(tmp_path / "saved")
    env = {**ENV, "HF_ENDPOINT": "http://hub.invalid", "HF_HOME": str(tmp_path / "hf")}
    made = subprocess.run([sys.executable, "-c", CACHED, str(tmp_path / "root"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env={**env, "HF_HUB_OFFLINE": "1"})
    assert made.returncode == 0, made.stderr

    def data(path: str) -> tuple[subprocess.CompletedProcess, float]:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "deqctl", "data",
             str(Path(RECIPE).parent / "shakespeare-deq.yaml"), "data.name=hf",
             f"data.hf.path={path}", f"data.root={tmp_path / 'root'}", "data.tokenizer=char",
             "data.seq_len=8"], capture_output=True, text=True, timeout=120, env=env)
        return done, time.monotonic() - started

    saved, base = data(str(tmp_path / "saved"))        # no hub involved: the start-up time
    assert saved.returncode == 0, saved.stderr
    cached, took = data("deqctl_tiny")
    assert cached.returncode == 0, cached.stderr
    assert took < base + 12, f"{took:.0f} s against {base:.0f} s to read the cached dataset"
    done, took = data("deqctl-no-such-dataset")
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert took < base + 12, f"{took:.0f} s against {base:.0f} s before: {errors[0]}"
