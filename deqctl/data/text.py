"""Language-modelling data: text files, the embedded Shakespeare corpus (and Hugging Face
text columns, deqctl.data.hf), tokenized once into cached token files (deqctl.data.tokens).

A text becomes one token stream, cut into consecutive sequences of `seq_len` tokens whose
targets are the same tokens shifted by one: every token of a split except the first is
predicted exactly once (the last partial sequence is dropped), with the context available
inside its own sequence.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import quote
from ..files import is_regular
from ..options import Block
from .base import DataBundle, DataError, DataInfo, Split
from .images import EMBEDDED
from .registry import source
from .settings import TextTokens
from .tokenize import TokenizerError, kind_of, of, read_tokenizer_file
from .tokens import Text, TokenCache, text_file, windows


class TextFiles(Block):
    train: str | None = None
    val: str | None = None
    test: str | None = None


class TextData(TextTokens):
    """Local UTF-8 text files, read line by line."""

    files: TextFiles = TextFiles()


def _tokenizer(cfg, cache: TokenCache, train: Text):
    """The tokenizer `cfg.tokenizer` names: fitted on the training text (cached), or read
    from a tokenizer.json file."""
    kind = kind_of(cfg.tokenizer)
    settings = {"word": {"min_freq": cfg.min_freq, "max_size": cfg.max_size},
                "bpe": {"vocab_size": cfg.vocab_size}}.get(kind, {})
    try:
        if kind == "file":
            return read_tokenizer_file(Path(cfg.tokenizer).expanduser())
        sample = cfg.bpe_sample_mb * 2**20 if kind == "bpe" and cfg.bpe_sample_mb else None
        return cache.tokenizer(kind, train, sample=sample, **settings)
    except TokenizerError as exc:
        raise DataError(f"data.tokenizer: {exc}") from exc


def lm_bundle(name: str, texts: dict[str, Text], cfg, like: DataInfo | None) -> DataBundle:
    """Return a language-modelling bundle of `texts` ({"train"?, "val"?, "test"}), each
    tokenized into the token cache (or found there) and read through a memmap.

    The tokenizer comes from `like` (a trained model's data description) when given,
    else it is fitted on the training text; unknown tokens are counted per split.
    """
    cache = TokenCache.at(cfg.root)
    if like is not None:
        tok = of(like.tokenizer, like.vocab)
        if tok.kind != kind_of(cfg.tokenizer):
            raise DataError(f"data.tokenizer: the model was trained with {quote(tok.kind)}, "
                            f"not {quote(cfg.tokenizer)}")
    elif "train" in texts:
        tok = _tokenizer(cfg, cache, texts["train"])
    else:
        raise DataError("data.files.train: required to train (the vocabulary comes from it)")
    if "test" not in texts:
        raise DataError("data.files.test: required (the split evaluation reports)")
    facts = {k: {} for k in ("unknown_tokens", "tokens", "text_bytes", "text_words",
                             "token_files")}
    splits, notes = {}, []
    for part, text in texts.items():
        try:
            ids, meta = cache.tokens(tok, text)
        except TokenizerError as exc:
            raise DataError(f"data.tokenizer: {exc} ({text.name})") from exc
        splits[part] = Split(*windows(ids, cfg.seq_len, f"{name} {part}"),
                             per_token=_per_token(meta))
        facts["unknown_tokens"][part] = meta["unknown"]
        facts["tokens"][part], facts["text_bytes"][part] = meta["count"], meta["bytes"]
        facts["text_words"][part] = meta["words"]
        facts["token_files"][part] = meta["path"]
        if meta["unknown"]:
            notes.append(f"{name}: {meta['unknown']} {tok.unit}(s) of the {part} text are not "
                         f"in the training vocabulary; they are read as the unknown id "
                         f"{tok.unknown_id}")
        if meta.get("built") and meta["seconds"] >= 1:
            notes.append(f"{name}: tokenized the {part} text ({meta['count']:,} tokens) in "
                         f"{meta['seconds']:.0f} s into {cache.folder}")
    info = DataInfo(name=name, task="lm", inputs="tokens", shape=(cfg.seq_len,),
                    tokenizer=tok.kind, vocab=tok.stored)
    return DataBundle(info=info, train=splits.get("train"), test=splits["test"],
                      val=splits.get("val"), notes=notes, facts=facts)


def _per_token(meta: dict) -> dict[str, float]:
    """Bytes and words of a split's raw text per token: what its bits per byte and word
    perplexity divide by (data.Split.per_token)."""
    if not meta["count"]:
        return {}
    return {"bytes_per_token": meta["bytes"] / meta["count"],
            "words_per_token": meta["words"] / meta["count"]}


@source("shakespeare", TextTokens)
def load_shakespeare(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return the embedded Shakespeare corpus: 8 plays to train, A Midsummer Night's
    Dream to validate, The Merchant of Venice to test (public domain; see
    deqctl/data/embedded/README.md)."""
    folder = EMBEDDED / "shakespeare"
    files = {"train": folder / "train.txt", "val": folder / "valid.txt", "test": folder / "test.txt"}
    if not all(p.is_file() for p in files.values()):
        raise DataError(f"embedded shakespeare missing from {folder}; reinstall deqctl")
    return lm_bundle("shakespeare", {k: text_file(p, f"embedded shakespeare {k}")
                                     for k, p in files.items()}, cfg, like)


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
    return lm_bundle(name, {k: text_file(p, f"data.files.{k}: {p}") for k, p in files.items()},
                     cfg, like)
