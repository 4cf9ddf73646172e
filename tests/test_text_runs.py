"""Text models at the papers' scale (issue 30): metrics that compare across tokenizers
(perplexity per token, bits per byte of the raw text, perplexity per word; bits per
character only where a token is a character or a byte), and the tokenizer saved in every
checkpoint as its own tokenizer.json, checked when it is read."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from deqctl.cli import app
from deqctl.data import DataInfo, Split
from deqctl.data.tokens import count_words
from deqctl.tasks import task_for

from cli_helpers import CONFIGS, rows, runner

pytestmark = pytest.mark.usefixtures("one_thread")

LN2 = math.log(2.0)
TEXT = "".join(f"the {i % 13} cat sat on the mat, said nobody é{i % 5}\n\n  x\t y\n"
               for i in range(300))


def lm(tokenizer: str):
    return task_for(DataInfo(name="t", task="lm", inputs="tokens", shape=(8,),
                             tokenizer=tokenizer, vocab="ab" if tokenizer == "char" else None))


def split(**per_token) -> Split:
    import torch
    return Split(torch.zeros(1, 8, dtype=torch.int64), torch.zeros(1, 8, dtype=torch.int64),
                 per_token=per_token)


@pytest.mark.parametrize("text", [TEXT, "", " ", "a", "\n", "  two  words \n\n", "é ü\té"])
def test_words_are_counted_as_the_word_tokenizer_counts_them(text):
    expected = len(text.split()) + text.count("\n")
    assert count_words(text.encode()) == expected
    cuts = [i for i, c in enumerate(text) if c in " \n"]      # chunks are cut at whitespace
    for cut in cuts[::7]:
        assert count_words(text[:cut].encode()) + count_words(text[cut:].encode()) == expected


def test_each_tokenizer_reports_the_units_that_mean_something_for_it():
    heads = {kind: [m.key for m in lm(kind).metrics] for kind in ("char", "byte", "word", "bpe", "file")}
    assert heads == {"char": ["bpc", "ppl", "bpb"], "byte": ["bpc", "ppl"], "word": ["ppl", "bpb"],
                     "bpe": ["bpb", "ppl", "word_ppl"], "file": ["bpb", "ppl", "word_ppl"]}
    loss, per_token = 1.7, {"bytes_per_token": 4.0, "words_per_token": 0.8}
    bpe = lm("bpe").finish({"loss": loss}, split(**per_token))
    assert bpe["ppl"] == pytest.approx(math.exp(loss))
    assert bpe["bpb"] == pytest.approx(loss / LN2 / 4.0)
    # nats per word = nats per token * tokens per word
    assert bpe["word_ppl"] == pytest.approx(math.exp(loss / 0.8))
    assert "bpc" not in bpe
    word = lm("word").finish({"loss": loss}, split(**per_token))
    assert set(word) == {"loss", "ppl", "bpb"}
    assert set(lm("char").finish({"loss": loss})) == {"loss", "bpc", "ppl"}    # no text: no bpb
    assert set(lm("byte").finish({"loss": loss}, split(**per_token))) == {"loss", "bpc", "ppl"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    (root / "train.txt").write_text(TEXT, encoding="utf-8")
    (root / "test.txt").write_text(TEXT[: len(TEXT) // 3], encoding="utf-8")
    out = {}
    for kind in ("char", "word", "bpe"):
        out[kind] = root / kind
        result = runner.invoke(app, [
            "train", str(CONFIGS / "shakespeare-deq.yaml"), "data.name=text",
            f"data.files.train={root / 'train.txt'}", f"data.files.test={root / 'test.txt'}",
            f"data.root={root / 'cache'}", f"data.tokenizer={kind}", "data.vocab_size=300",
            "data.seq_len=16", "data.batch_size=8", "data.eval_batch_size=16",
            "train.max_steps=2", "train.log_every=1", "runtime.threads=1",
            "model={name: transformer_deq, d_model: 16, heads: 2, d_ff: 32}",
            "--out", str(out[kind]), "--plain"])
        assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_bits_per_byte_divide_the_loss_by_the_splits_own_text(runs, kind):
    result = runner.invoke(app, ["eval", str(runs[kind]), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    facts = got["data"]
    tokens, text_bytes, words = (facts[k]["test"] for k in ("tokens", "text_bytes", "text_words"))
    assert text_bytes == len(TEXT[: len(TEXT) // 3].encode()) and words == count_words(
        TEXT[: len(TEXT) // 3].encode())
    loss = got["loss"]
    if kind != "bpe":
        assert got["bpb" if kind == "word" else "bpc"] == pytest.approx(
            loss / LN2 * (tokens / text_bytes if kind == "word" else 1))
    assert got["bpb"] == pytest.approx(loss / LN2 * tokens / text_bytes)
    if kind == "bpe":
        assert got["word_ppl"] == pytest.approx(math.exp(loss * tokens / words))
    if kind == "word":        # a word is a token: its perplexity is the per-word one
        assert tokens == words and "word_ppl" not in got
    # training rows carry them too, from the training text
    train_rows = [r for r in rows(runs[kind]) if r["split"] == "train"]
    assert train_rows and all("bpb" in r for r in train_rows)
    assert np.isfinite([r["bpb"] for r in train_rows]).all()


def final(run):
    return run / "checkpoints" / "final"


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_the_checkpoint_holds_a_tokenizer_json_that_hugging_face_opens(runs, kind):
    from tokenizers import Tokenizer
    from deqctl.data.tokenize import of

    ckpt = final(runs[kind])
    meta = json.loads((ckpt / "meta.json").read_text())
    assert "vocab" not in meta["data_info"] and len(meta["tokenizer_sha256"]) == 64
    theirs = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    ours = of(kind, (ckpt / "tokenizer.json").read_text())
    line = "the 3 cat sat on the mat"
    assert theirs.encode(line).ids == ours.encode(line).tolist()
    result = runner.invoke(app, ["generate", str(runs[kind]), "--prompt", "the cat", "--tokens", "3"])
    assert result.exit_code == 0, result.output


def test_a_char_checkpoint_keeps_its_characters_in_meta(runs):
    assert not (final(runs["char"]) / "tokenizer.json").exists()
    assert json.loads((final(runs["char"]) / "meta.json").read_text())["data_info"]["vocab"]


@pytest.mark.parametrize("damage", ["edited", "other run", "missing", "not utf-8", "folder"])
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_tokenizer_json_edited_or_from_another_run_is_one_line(runs, tmp_path, damage, command):
    copy = tmp_path / "ckpt"
    shutil.copytree(final(runs["word"]), copy)
    tok = copy / "tokenizer.json"
    if damage == "edited":
        tok.write_text(tok.read_text().replace('"cat"', '"dog"'))
    elif damage == "other run":
        shutil.copy(final(runs["bpe"]) / "tokenizer.json", tok)
    elif damage == "missing":
        tok.unlink()
    elif damage == "not utf-8":
        tok.write_bytes(b"\xff\xfe" + tok.read_bytes())
    else:
        tok.unlink()
        tok.mkdir()
    args = ["--json"] if command == "eval" else ["--prompt", "the", "--tokens", "2"]
    result = runner.invoke(app, [command, str(copy), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "tokenizer.json" in lines[0], result.output
    assert "Traceback" not in result.output


def test_a_checkpoint_with_the_tokenizer_inside_meta_json_still_loads(runs, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(final(runs["word"]), copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["data_info"]["vocab"] = (copy / "tokenizer.json").read_text()
    del meta["tokenizer_sha256"]
    (copy / "meta.json").write_text(json.dumps(meta))
    (copy / "tokenizer.json").unlink()
    result = runner.invoke(app, ["eval", str(copy), "--json"])
    assert result.exit_code == 0, result.output
