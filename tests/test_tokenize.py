"""Word, BPE and tokenizer.json vocabularies: round trips on text with unknown characters and
words, the text source and a model trained on them, and the one-line error for a bad file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deqctl import recipe as recipes
from deqctl.cli import app
from deqctl.data import DataError, DataInfo, Tokenizer, build_data
from deqctl.data.tokenize import EOS, UNK, train_tokenizer

from cli_helpers import CONFIGS, rows, runner

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ("the cat sat on the mat\nthe dog sat on the log\n\n"
         "a cat and a dog\n") * 5
UNSEEN = "the cow sat on the moon\nzebra é 日本 ☃\n"


def data(**kw):
    return recipes.validate({"data": kw}).data


@pytest.mark.parametrize("kind", ["char", "byte", "word", "bpe"])
def test_each_tokenizer_round_trips_its_training_text(kind):
    tok = train_tokenizer(kind, TRAIN.splitlines(keepends=True), vocab_size=300)
    ids = tok.encode(TRAIN)
    assert ids.dtype == np.int64 and 0 <= ids.min() and ids.max() < tok.size
    assert tok.decode(ids) == TRAIN
    assert tok.unknown_in(ids) == 0
    push = tok.stream()                         # generate's token-by-token text
    assert "".join(push(int(i)) for i in ids) == TRAIN


def test_unknown_characters_and_words():
    lines = TRAIN.splitlines(keepends=True)
    # bytes and byte-level BPE represent any text exactly
    for kind in ("byte", "bpe"):
        tok = train_tokenizer(kind, lines, vocab_size=300)
        assert tok.decode(tok.encode(UNSEEN)) == UNSEEN
        assert tok.unknown_id is None and tok.unknown_in(tok.encode(UNSEEN)) == 0
    # chars: each unseen character is the unknown id 0
    char = train_tokenizer("char", lines)
    assert char.unknown_in(char.encode("zé日")) == 3
    # words: each unseen word is <unk>, line ends are <eos>
    word = train_tokenizer("word", lines)
    ids = word.encode(UNSEEN)
    assert word.unknown_in(ids) == 6               # cow, moon, zebra, é, 日本, ☃
    assert word.decode(ids) == f"the {UNK} sat on the {UNK}\n{UNK} {UNK} {UNK} {UNK}\n"
    assert (ids == word.hf.token_to_id(EOS)).sum() == 2


def test_word_vocabulary_is_by_frequency_and_bounded():
    lines = TRAIN.splitlines(keepends=True)
    word = train_tokenizer("word", lines)
    vocab = word.hf.get_vocab()
    assert vocab[UNK] == 0 and vocab[EOS] == 1
    assert vocab["the"] == 2                      # the most frequent word (20 of them)
    assert vocab["the"] < vocab["cat"] < vocab["mat"]    # 20 > 10 > 5
    rare = train_tokenizer("word", lines, min_freq=10)
    assert set(rare.hf.get_vocab()) == {UNK, EOS, "the", "sat", "on", "cat", "dog", "a"}
    top = train_tokenizer("word", lines, max_size=2)
    assert top.size == 4 and "the" in top.hf.get_vocab()      # the specials, then the top two


def test_bpe_learns_the_vocabulary_size_asked():
    tok = train_tokenizer("bpe", TRAIN.splitlines(keepends=True), vocab_size=270)
    assert 256 < tok.size <= 270
    assert len(tok.encode(TRAIN)) < len(TRAIN.encode())      # merges shorten the text


@pytest.fixture
def files(tmp_path):
    for part, text in (("train", TRAIN), ("test", UNSEEN * 3)):
        (tmp_path / f"{part}.txt").write_text(text, encoding="utf-8")
    return {"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")}


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_the_text_source_stores_its_tokenizer_in_the_description(files, kind):
    b = build_data(data(name="text", tokenizer=kind, vocab_size=300, seq_len=4, files=files))
    tok = Tokenizer.of(b.info)
    assert b.info.tokenizer == kind and json.loads(b.info.vocab)["model"]
    assert b.info.vocab_size == tok.size
    again = DataInfo.from_dict(json.loads(json.dumps(b.info.as_dict())))   # as a checkpoint keeps it
    assert again == b.info
    assert tok.decode(b.train.inputs[0]) == tok.decode(tok.encode(TRAIN)[:4])
    if kind == "word":
        assert b.facts["unknown_tokens"]["test"] == 18
        assert any("18 word(s) of the test text" in n for n in b.notes)


def test_a_tokenizer_json_file_is_used_as_it_is(files, tmp_path):
    trained = train_tokenizer("bpe", [UNSEEN], vocab_size=280)
    path = tmp_path / "tokenizer.json"
    path.write_text(trained.json, encoding="utf-8")
    b = build_data(data(name="text", tokenizer=str(path), seq_len=4, files=files))
    assert b.info.tokenizer == "file" and b.info.vocab == trained.json
    assert b.info.vocab_size == trained.size


@pytest.mark.parametrize("content", ["{not json", '{"model": 3}', ""])
def test_a_corrupt_tokenizer_file_is_one_line(files, tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        build_data(data(name="text", tokenizer=str(path), seq_len=4, files=files))
    assert "\n" not in str(err.value) and str(err.value).startswith("data.tokenizer:")


def test_a_tokenizer_setting_is_a_name_or_a_json_path():
    with pytest.raises(recipes.RecipeError, match="data.tokenizer"):
        data(name="text", tokenizer="sentencepiece")


def test_a_corrupt_stored_tokenizer_is_a_malformed_description():
    info = {"name": "t", "task": "lm", "inputs": "tokens", "shape": [8], "tokenizer": "bpe",
            "vocab": '{"model": "nope"}'}
    with pytest.raises(ValueError, match="tokenizer"):
        DataInfo.from_dict(info)


def test_a_word_model_trains_evaluates_and_generates(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "train", str(CONFIGS / "shakespeare-deq.yaml"), "data.tokenizer=word", "train.max_steps=2",
        "data.seq_len=16", "data.limit_train=64", "data.limit_eval=16", "data.batch_size=16",
        "data.eval_batch_size=16", "runtime.threads=1",
        "model={name: transformer_deq, d_model: 16, heads: 2, d_ff: 32}", "--out", str(out),
        "--plain"])
    assert result.exit_code == 0, result.output
    test = [r for r in rows(out) if r["split"] == "test"][-1]
    assert np.isfinite(test["loss"])
    result = runner.invoke(app, ["generate", str(out), "--prompt", "ROMEO:\nWhat light",
                                 "--tokens", "5", "--greedy", "--json"])
    assert result.exit_code == 0, result.output
    text = json.loads(result.stdout)["text"]
    assert len(text.replace("\n", " ").split()) >= 4          # five words (or line ends)
    assert text[0] in " \n"              # the first word is not glued to the prompt's last
    blank = runner.invoke(app, ["generate", str(out), "--prompt", "   ", "--tokens", "2"])
    assert blank.exit_code == 2 and "the prompt encodes to no tokens" in blank.output


def test_generated_control_characters_never_reach_the_terminal(capsys):
    from deqctl.cli.generate import _stream

    _stream("ok\x1b[2J\x07\r\tend\n\x9b")
    assert capsys.readouterr().out == "ok\ufffd[2J\ufffd\ufffd\tend\n\ufffd"


def test_a_wordpiece_file_counts_its_own_unknown_token(tmp_path):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers

    hf = HF(models.WordPiece({"[UNK]": 0, "the": 1, "cat": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    path.write_text(hf.to_str())
    from deqctl.data.tokenize import read_tokenizer_file

    tok = read_tokenizer_file(path)
    assert tok.unknown_id == 0 and tok.unknown_in(tok.encode("the zebra cat quux")) == 2
