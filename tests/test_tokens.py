"""Token files: tokenized once, reused, rebuilt when cut off or edited, prepared once by two
processes at a time, read in bounded chunks, and read through a memmap to exactly the batches
(and the losses) the in-memory path gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deqctl import recipe as recipes
from deqctl.cli import app
from deqctl.data import DataError, build_data, iterate_batches
from deqctl.data import tokens as T

from cli_helpers import CONFIGS, rows, runner

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(f"line {i} of the corpus, with words é{i % 7}\n" for i in range(400))


def data(**kw):
    return recipes.validate({"data": kw}).data


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "test.txt").write_text(TEXT[:3000], encoding="utf-8")
    return {"name": "text", "seq_len": 16, "root": str(tmp_path / "cache"),
            "files": {"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")}}


def entries(corpus) -> dict[str, dict]:
    folder = Path(corpus["root"]) / "tokens"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")
            if not p.name.endswith(".tokenizer.json")}


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_a_text_is_tokenized_once_then_reused(corpus, kind):
    cfg = data(**corpus, tokenizer=kind, vocab_size=300)
    first = build_data(cfg)
    built = entries(corpus)
    assert len(built) == 2 and all(m["dtype"] == "uint16" for m in built.values())
    mtimes = {p: p.stat().st_mtime_ns for p in (Path(corpus["root"]) / "tokens").iterdir()}
    again = build_data(cfg)
    assert {p: p.stat().st_mtime_ns for p in (Path(corpus["root"]) / "tokens").iterdir()} == mtimes
    assert torch.equal(first.train.inputs, again.train.inputs) and first.info == again.info
    assert not list((Path(corpus["root"]) / "tokens").glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["truncate", "edit", "description"])
def test_a_damaged_token_file_is_rebuilt(corpus, damage):
    cfg = data(**corpus)
    clean = build_data(cfg)
    key, meta = next((k, m) for k, m in entries(corpus).items() if m["text"].startswith(
        "data.files.train"))
    ids = Path(corpus["root"]) / "tokens" / f"{key}.ids"
    raw = bytearray(ids.read_bytes())
    if damage == "truncate":
        ids.write_bytes(raw[:-6])
    elif damage == "edit":
        raw[10] ^= 1
        ids.write_bytes(raw)
    else:
        (ids.with_suffix(".json")).write_text("{cut off")
    rebuilt = build_data(cfg)
    assert torch.equal(rebuilt.train.inputs, clean.train.inputs)
    assert ids.read_bytes() == bytes(bytearray(raw)) if damage == "description" else True
    assert T._valid(ids, ids.with_suffix(".json")) is not None


def test_two_processes_preparing_the_same_text_build_it_once(corpus, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text(TEXT * 40, encoding="utf-8")
    script = (f"from deqctl import recipe as r; from deqctl.data import build_data; "
              f"b = build_data(r.validate({{'data': {{'name': 'text', 'seq_len': 16, "
              f"'root': {corpus['root']!r}, 'files': {{'train': {str(big)!r}, "
              f"'test': {corpus['files']['test']!r}}}}}}}).data); "
              f"print(int(b.train.inputs.sum()), b.facts['tokens']['train'])")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1] and outs[0].strip()
    folder = Path(corpus["root"]) / "tokens"
    assert len(list(folder.glob("*.ids"))) == 2 and not list(folder.glob(".*.tmp"))
    built = [m for m in entries(corpus).values() if m["text"].endswith("big.txt")]
    assert len(built) == 1 and built[0]["count"] == len(TEXT * 40)


def test_a_file_with_no_line_end_is_read_in_bounded_chunks(monkeypatch, tmp_path):
    monkeypatch.setattr(T, "CHUNK_CHARS", 100)
    text = ("word " * 1000).strip() + "x" * 450              # one line; a space-free tail
    path = tmp_path / "one-line.txt"
    path.write_text(text, encoding="utf-8")
    chunks = list(T.text_file(path, "one-line").chunks())
    assert "".join(chunks) == text and max(map(len, chunks)) <= 200
    assert all(c.endswith("word") or c.endswith("x") for c in chunks[:-1])   # cut before a space


def test_the_memmap_path_gives_the_in_memory_batches(corpus, monkeypatch):
    cfg = data(**corpus, limit_train=40)
    memory = build_data(cfg)
    monkeypatch.setattr(T, "IN_MEMORY_TOKENS", 0)
    mapped = build_data(cfg)
    assert isinstance(mapped.train.inputs, T.TokenWindows) and len(mapped.train) == 40
    assert isinstance(memory.train.inputs, torch.Tensor)
    for a, b in zip(iterate_batches(memory.train, 8, shuffle=True, seed=3, epoch=1, start=2),
                    iterate_batches(mapped.train, 8, shuffle=True, seed=3, epoch=1, start=2)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    windows = mapped.test.inputs
    assert torch.equal(windows[2:5][1], memory.test.inputs[3])
    assert torch.equal(mapped.test.rows(slice(2, 5)).inputs[1], memory.test.inputs[3])
    with pytest.raises(IndexError):
        windows[torch.tensor([len(windows)])]


def test_training_from_a_token_file_matches_training_in_memory(monkeypatch, tmp_path, corpus):
    def train(out, mapped: bool) -> list[float]:
        monkeypatch.setattr(T, "IN_MEMORY_TOKENS", 0 if mapped else 1 << 21)
        files = corpus["files"]
        result = runner.invoke(app, [
            "train", str(CONFIGS / "shakespeare-deq.yaml"), "data.name=text",
            f"data.files.train={files['train']}", f"data.files.test={files['test']}",
            f"data.root={corpus['root']}", "data.seq_len=16", "data.batch_size=8",
            "data.eval_batch_size=16", "train.max_steps=3", "train.log_every=1",
            "runtime.threads=1", "model={name: transformer_deq, d_model: 16, heads: 2, d_ff: 32}",
            "--out", str(out), "--plain"])
        assert result.exit_code == 0, result.output
        return [r["loss"] for r in rows(out)]

    assert train(tmp_path / "mapped", True) == train(tmp_path / "memory", False)


def test_ids_past_65536_are_stored_as_uint32(tmp_path):
    class Wide:
        kind, stored, size, unknown_id, unit = "fake", "x", 70_000, None, "token"

        def encode(self, text):
            return np.array([69_999, 1, 65_536], np.int64)

        def unknown_in(self, ids):
            return 0

    cache = T.TokenCache(tmp_path)
    ids, meta = cache.tokens(Wide(), T.Text("t", "fp", lambda: iter(["abc"])))
    assert meta["dtype"] == "uint32" and ids.tolist() == [69_999, 1, 65_536]


# --- hostile input (found by a hostile test of this surface) ------------------------------


def word_tokenizer_file(tmp_path, vocab: dict) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    path.write_text(hf.to_str())
    return str(path)


def test_ids_with_gaps_size_the_vocabulary_and_ids_past_the_bound_are_refused(corpus, tmp_path):
    sparse = word_tokenizer_file(tmp_path, {"<unk>": 0, "line": 70_000, "of": 5})
    b = build_data(data(**corpus, tokenizer=sparse))
    assert b.info.vocab_size == 70_001 and int(b.train.inputs.max()) == 70_000  # not cut to uint16
    huge = word_tokenizer_file(tmp_path, {"<unk>": 0, "line": 4_000_000_000})
    with pytest.raises(DataError, match=r"token ids must lie in 0 \.\. 16777215"):
        build_data(data(**corpus, tokenizer=huge))


def test_a_long_run_without_spaces_is_cut_into_pieces_before_bpe():
    from deqctl.data.tokenize import LONGEST_RUN, train_tokenizer

    tok = train_tokenizer("bpe", ["ab " * 50], vocab_size=260)
    pieces = tok.hf.pre_tokenizer.pre_tokenize_str("x" * 1000 + " tail")
    assert max(len(p) for p, _ in pieces) <= LONGEST_RUN         # training stays linear
    assert tok.decode(tok.encode("x" * 1000 + " tail")) == "x" * 1000 + " tail"


def test_a_read_only_cache_that_holds_the_entries_is_read(corpus, monkeypatch):
    import errno

    cfg = data(**corpus)
    first = build_data(cfg)
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)
    monkeypatch.setattr(os, "open", read_only)
    assert torch.equal(build_data(cfg).train.inputs, first.train.inputs)


def test_damaged_cache_files_are_rebuilt_or_one_line(corpus):
    cfg = data(**corpus, tokenizer="word")
    clean = build_data(cfg)
    folder = Path(corpus["root"]) / "tokens"
    fitted = next(folder.glob("*.tokenizer.json"))
    for damage in ("[1, 2]", '{"kind": "word"}', '{"kind": "byte", "vocab": null}'):
        fitted.write_text(damage)                       # refitted, of the kind asked for
        again = build_data(cfg)
        assert again.info == clean.info and torch.equal(again.train.inputs, clean.train.inputs)
    ids = next(p for p in folder.glob("*.ids"))
    ids.unlink()
    os.mkfifo(ids)                                      # refused, not waited on; rebuilt
    (folder / f".{ids.name}.123.tmp").write_bytes(b"left by a killed builder")
    done = subprocess.run([sys.executable, "-c", (
        "from deqctl import recipe as r; from deqctl.data import build_data; "
        f"build_data(r.validate({{'data': {dict(corpus, tokenizer='word')!r}}}).data)")],
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and ids.is_file() and not list(folder.glob(".*.tmp"))
    for lock in folder.glob("*.lock"):
        lock.unlink()
        lock.mkdir()
    with pytest.raises(DataError, match="token cache .*: Is a directory"):
        build_data(cfg)


def test_an_epoch_of_a_large_token_file_plans_its_batches_as_they_are_read(tmp_path):
    """The batches of an epoch were planned up front, a tensor per batch: 181,000 of them
    for 1 GB of text at batch 16 (+123 MB of memory that grew with the corpus; issue 30).
    Starting an epoch of 2M sequences now costs its order (8 bytes a sequence), no more."""
    from deqctl.data import Split, iterate_batches
    from deqctl.data.tokens import TokenWindows

    def anonymous_mb() -> float:     # this process's memory now (not its page cache)
        status = Path("/proc/self/status").read_text()
        return int(status.split("RssAnon:")[1].split()[0]) / 1024

    if not Path("/proc/self/status").exists():
        pytest.skip("reads /proc/self/status (Linux)")
    ids = np.lib.format.open_memmap(tmp_path / "ids.npy", mode="w+", dtype=np.uint16,
                                    shape=(2_000_000 * 8 + 1,))
    split = Split(TokenWindows(ids, 8, 0), TokenWindows(ids, 8, 1))
    before = anonymous_mb()
    batches = iterate_batches(split, 4, shuffle=True, seed=0, epoch=0, start=3)
    x, y = next(batches)
    grown_mb = anonymous_mb() - before
    assert x.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert grown_mb < 16 + 20, grown_mb         # the order: 16 MB; the plan was ~150 MB


def test_reading_sequences_keeps_no_page_of_the_token_file_mapped(tmp_path):
    """Sequences read through the memmap left each touched page mapped, with ~16 neighbours
    the kernel maps around it, all counted as resident memory: 240 MiB of a 354 MiB token
    file after 200 batches of 16 (issue 30's memory target). They are read from the file."""
    from deqctl.data import Split, iterate_batches
    from deqctl.data.tokens import TokenWindows

    def mapped_mb(path: Path) -> float:
        rss, here = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()
            if "-" in head[0] and ":" not in head[0]:
                here = len(head) > 5 and head[5] == str(path)
            elif here and head[0] == "Rss:":
                rss += int(head[1])
        return rss / 1024

    if not Path("/proc/self/smaps").exists():
        pytest.skip("reads /proc/self/smaps (Linux)")
    path = tmp_path / "train.ids"
    whole = np.random.default_rng(0).integers(0, 2**16, 64 * 200_000 + 1, dtype=np.uint16)
    whole.tofile(path)                                      # in the page cache, as after a build
    ids = np.memmap(path, dtype=np.uint16, mode="r")
    split = Split(TokenWindows(ids, 64, 0), TokenWindows(ids, 64, 1))
    batches = iterate_batches(split, 16, shuffle=True, seed=0, epoch=0, with_index=True)
    for _ in range(200):
        x, y, index = next(batches)
        starts = index.numpy()[:, None] * 64 + np.arange(64)
        assert np.array_equal(x.numpy(), whole[starts]) and np.array_equal(y.numpy(), whole[starts + 1])
    assert mapped_mb(path) < 2, mapped_mb(path)             # it was ~16 MiB here


def test_a_bpe_is_fitted_on_a_sample_spread_over_a_large_text(corpus, monkeypatch):
    monkeypatch.setattr(T, "CHUNK_CHARS", 200)
    seen: list[str] = []
    fit = T.train_tokenizer

    def watch(kind, lines, **settings):
        return fit(kind, (seen.append(line) or line for line in lines), **settings)
    monkeypatch.setattr(T, "train_tokenizer", watch)
    size = len(TEXT.encode("utf-8"))
    cfg = data(**corpus, tokenizer="bpe", vocab_size=300, bpe_sample_mb=size / 4 / 2**20)
    bundle = build_data(cfg)
    fitted = "".join(seen)
    assert 0.2 * size < len(fitted.encode("utf-8")) < 0.3 * size
    assert "line 3 " in fitted and "line 39" in fitted            # the start and the end
    # encoding still reads all of it: every line's ids are there
    whole = build_data(data(**corpus, tokenizer="bpe", vocab_size=300, bpe_sample_mb=None))
    assert bundle.info.vocab != whole.info.vocab                   # a fit of its own, cached apart
    assert bundle.train.inputs.numel() >= whole.train.inputs.numel() * 0.9


def test_a_sample_of_a_text_of_unknown_size_is_spread_too(monkeypatch):
    monkeypatch.setattr(T, "CHUNK_CHARS", 100)
    text = T.text_rows("rows", "rows:1", lambda: (f"row {i} here\n" for i in range(1000)))
    sample = "".join(T.sample_chunks(text, 3000))
    assert 2500 < len(sample) < 3500 and "row 0 " in sample and "row 97" in sample
    assert "".join(T.sample_chunks(text, None)) == "".join(text.chunks())
