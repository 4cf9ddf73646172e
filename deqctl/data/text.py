"""Language-modelling data: char / byte tokenizers, text files read through Hugging Face
`datasets`, and the embedded Shakespeare corpus.

A text becomes one token stream, cut into consecutive sequences of `seq_len` tokens whose
targets are the same tokens shifted by one: every token of a split except the first is
predicted exactly once (the last partial sequence is dropped), with the context available
inside its own sequence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pydantic import Field

from ..errors import quote
from ..files import is_regular
from ..options import Block
from .base import DataBundle, DataError, DataInfo, Split
from .images import EMBEDDED
from .registry import source
from .settings import TextTokens
from .tokenize import (BUILT_IN, TRAINED, Tokenizer, TokenizerError, kind_of, of,
                       read_tokenizer_file, train_tokenizer)


class TextFiles(Block):
    train: str | None = None
    val: str | None = None
    test: str | None = None


class TextData(TextTokens):
    """Local UTF-8 text files, read through Hugging Face datasets' "text" builder."""

    files: TextFiles = TextFiles()
    root: str | None = Field(None, description="datasets cache directory")


def encode(tok: Tokenizer, text: str) -> tuple[torch.Tensor, int]:
    """Return (int64 ids of `text`, how many of them are the unknown id)."""
    ids = tok.encode(text)
    return torch.from_numpy(ids), tok.unknown_in(ids)


def fit_tokenizer(cfg, text: str) -> Tokenizer:
    """Return the tokenizer `cfg.tokenizer` names, fitted on the training text (or read
    from a tokenizer.json file)."""
    try:
        if cfg.tokenizer in BUILT_IN + TRAINED:
            return train_tokenizer(cfg.tokenizer, text.splitlines(keepends=True),
                                   vocab_size=cfg.vocab_size, min_freq=cfg.min_freq,
                                   max_size=cfg.max_size)
        return read_tokenizer_file(Path(cfg.tokenizer).expanduser())
    except TokenizerError as exc:
        raise DataError(f"data.tokenizer: {exc}") from exc


def sequences(ids: torch.Tensor, seq_len: int, where: str) -> Split:
    """Cut a token stream into (inputs, next-token targets), each (N, seq_len)."""
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise DataError(f"{where}: {ids.numel()} tokens, fewer than data.seq_len + 1 = "
                        f"{seq_len + 1}")
    return Split(ids[:n * seq_len].view(n, seq_len).clone(),
                 ids[1:n * seq_len + 1].view(n, seq_len).clone())


def read_text_files(files: dict[str, Path], cache_dir: str | None) -> dict[str, str]:
    """Return {split: whole file as one string}, read with `datasets`' "text" builder
    (which caches the parsed files under `cache_dir`)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset("text", data_files={k: str(p) for k, p in files.items()},
                                   sample_by="document", cache_dir=cache_dir)
    except Exception as exc:  # datasets wraps file problems (decoding among them) in its own types
        bad = next((k for k, p in files.items() if not _is_utf8(p)), None)
        if bad is not None:
            raise DataError(f"data.files.{bad}: {files[bad]} is not UTF-8 text") from None
        raise DataError(f"reading {', '.join(map(str, files.values()))} failed: "
                        f"{str(exc).splitlines()[0][:200]}") from None
    return {k: "".join(ds[k]["text"]) for k in files}


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def lm_bundle(name: str, texts: dict[str, str], cfg, like: DataInfo | None) -> DataBundle:
    """Return a language-modelling bundle of `texts` ({"train"?, "val"?, "test"}).

    The tokenizer comes from `like` (a trained model's data description) when given,
    else it is fitted on the training text; unknown characters are counted per split.
    """
    if like is not None:
        tok = of(like.tokenizer, like.vocab)
        if tok.kind != kind_of(cfg.tokenizer):
            raise DataError(f"data.tokenizer: the model was trained with {quote(tok.kind)}, "
                            f"not {quote(cfg.tokenizer)}")
    elif "train" in texts:
        tok = fit_tokenizer(cfg, texts["train"])
    else:
        raise DataError("data.files.train: required to train (the vocabulary comes from it)")
    splits, notes, unknown = {}, [], {}
    for part, text in texts.items():
        ids, unk = encode(tok, text)
        splits[part] = sequences(ids, cfg.seq_len, f"{name} {part}")
        unknown[part] = unk
        if unk:
            notes.append(f"{name}: {unk} {tok.unit}(s) of the {part} text are not in the "
                         f"training vocabulary; they are read as the unknown id "
                         f"{tok.unknown_id}")
    info = DataInfo(name=name, task="lm", inputs="tokens", shape=(cfg.seq_len,),
                    tokenizer=tok.kind, vocab=tok.stored)
    if "test" not in splits:
        raise DataError("data.files.test: required (the split evaluation reports)")
    return DataBundle(info=info, train=splits.get("train"), test=splits["test"],
                      val=splits.get("val"), notes=notes, facts={"unknown_tokens": unknown})


@source("shakespeare", TextTokens)
def load_shakespeare(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return the embedded Shakespeare corpus: 8 plays to train, A Midsummer Night's
    Dream to validate, The Merchant of Venice to test (public domain; see
    deqctl/data/embedded/README.md)."""
    folder = EMBEDDED / "shakespeare"
    files = {"train": folder / "train.txt", "val": folder / "valid.txt", "test": folder / "test.txt"}
    if not all(p.is_file() for p in files.values()):
        raise DataError(f"embedded shakespeare missing from {folder}; reinstall deqctl")
    return lm_bundle("shakespeare", read_text_files(files, None), cfg, like)


@source("text", TextData)
def load_text(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return UTF-8 text files data.files.{train,val,test} as a language-modelling bundle.
    With `like` (evaluating a trained model) no training file is needed."""
    files = {}
    for part in ("train", "val", "test"):
        given = getattr(cfg.files, part)
        if given is None:
            continue
        path = Path(given).expanduser()
        if not path.exists():
            raise DataError(f"data.files.{part}: {path} not found")
        if not is_regular(path):
            raise DataError(f"data.files.{part}: {path} is not a regular file")
        files[part] = path
    if "train" not in files and like is None:
        raise DataError("data.files.train: required to train (the vocabulary comes from it)")
    if "test" not in files:
        raise DataError("data.files.test: required (the split evaluation reports)")
    name = f"text:{files.get('train', files['test']).stem}"
    return lm_bundle(name, read_text_files(files, cfg.root), cfg, like)
