"""Tokenizers: how a text becomes token ids and back.

- `char`: id i + 1 is the i-th character of a vocabulary built from the training text; 0 is
  unknown. `byte`: ids are the UTF-8 bytes; nothing is unknown. Both are tiny and need no
  library.
- `word`: whitespace-split words with `<eos>` at each line end and `<unk>` for words the
  training text lacks (or that `min_freq` / `max_size` drop), as locuslab/deq reads
  WikiText-103. Ids are ordered by frequency, most frequent first (what an adaptive softmax's
  cutoffs assume).
- `bpe`: a byte-level BPE trained on the training text with Hugging Face `tokenizers`
  (`vocab_size` ids); any text round-trips exactly.
- a path to a `tokenizer.json` (e.g. GPT-2's): a pretrained Hugging Face tokenizer.

`word`, `bpe` and file tokenizers travel as their `tokenizer.json` text: data, never code.
"""

from __future__ import annotations

import codecs
import functools
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .base import DataError

UNKNOWN = 0              # char vocabularies: the id of every character the training text lacks
UNK, EOS = "<unk>", "<eos>"
BUILT_IN = ("char", "byte")
TRAINED = ("word", "bpe")
LONGEST_RUN = 256        # bpe: characters without a space read as one piece, at most
LONGEST_LINE = 1 << 16   # word, bpe: a longer line reaches the library in pieces (_pieces)
MAX_IDS = 2**24          # an embedding row per id: 16.7M ids is already 8.6G parameters at 512
JSON_LIMIT = 64 * 2**20  # a tokenizer.json of GPT-2's 50k BPE is ~2 MB, a 267k-word vocab ~6 MB


class TokenizerError(DataError, ValueError):
    """A tokenizer that cannot be built, read or used; str() is one line. A data problem
    (exit 2), and a ValueError to a reader of a stored data description."""


class Tokenizer:
    """What every tokenizer offers: `kind`, `size` (ids), `unknown_id` (None when every
    text is representable), `stored` (what DataInfo.vocab keeps), `encode`, `decode`."""

    kind: str
    size: int
    unknown_id: int | None
    unit = "token"                 # what an unknown id stands for, in messages

    @staticmethod
    def of(info) -> Tokenizer:
        """Return the tokenizer a model was trained with, from its data description."""
        return of(info.tokenizer, info.vocab)

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def unknown_in(self, ids: np.ndarray) -> int:
        """How many of `ids` are the unknown id."""
        return 0 if self.unknown_id is None else int((np.asarray(ids) == self.unknown_id).sum())

    def stream(self, before: list[int] = ()) -> Callable[[int], str]:
        """Return a function turning one generated id after another (continuing the ids
        `before`) into the text each adds: bytes and subwords are held back while they end
        inside a character."""
        pending: list[int] = []

        def push(token: int) -> str:
            pending.append(token)
            text = self.decode(pending)
            if text.endswith("\ufffd") and len(pending) < 8:   # a character still incomplete
                return ""
            pending.clear()
            return text
        return push


@dataclass(frozen=True)
class CharTokenizer(Tokenizer):
    """`char` (with its vocabulary) or `byte`."""

    kind: str
    vocab: str | None = None

    @property
    def unit(self) -> str:
        return "character" if self.kind == "char" else "byte"

    @property
    def size(self) -> int:
        return 256 if self.kind == "byte" else len(self.vocab) + 1

    @property
    def unknown_id(self) -> int | None:
        return None if self.kind == "byte" else UNKNOWN

    @property
    def stored(self) -> str | None:
        """What a data description keeps of it (DataInfo.vocab): the characters."""
        return self.vocab

    def encode(self, text: str) -> np.ndarray:
        """Return the ids of `text` (int64)."""
        if self.kind == "byte":
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        uniq, inverse = np.unique(codes, return_inverse=True)
        index = {ord(c): i + 1 for i, c in enumerate(self.vocab)}
        mapped = np.array([index.get(int(c), UNKNOWN) for c in uniq], dtype=np.int64)
        return mapped[inverse].reshape(-1)

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of `ids` (unknown ids as U+FFFD)."""
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.vocab[i - 1] if i > 0 else "\ufffd" for i in ids)

    def stream(self, before: list[int] = ()) -> Callable[[int], str]:
        if self.kind == "char":
            return lambda token: self.decode([token])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: decoder.decode(bytes([token]))


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (`word`, `bpe` or a file), kept with its JSON."""

    def __init__(self, kind: str, json_text: str):
        from tokenizers import Tokenizer as HF

        try:
            self.hf = HF.from_str(json_text)
        except Exception as exc:  # the library raises its own Exception for any bad JSON
            raise TokenizerError(f"not a Hugging Face tokenizer.json "
                                 f"({str(exc).splitlines()[0][:120] if str(exc) else exc!r})") from exc
        if self.hf.truncation or self.hf.padding:
            # a file's own truncation (max_length 512 in many published ones) would cut
            # every long line, its padding add pad ids: the text is the user's, all of it.
            # The JSON kept is the one without them, so token files cached with them go.
            self.hf.no_truncation()
            self.hf.no_padding()
            json_text = self.hf.to_str()
        self.kind, self.json = kind, json_text
        self.unit = "word" if kind == "word" else "token"
        ids = self.hf.get_vocab(with_added_tokens=True).values()
        self.size = max(ids, default=-1) + 1      # ids may leave gaps: the largest one counts
        if not 0 < self.size <= MAX_IDS or min(ids) < 0:
            raise TokenizerError(f"token ids must lie in 0 .. {MAX_IDS - 1} (this vocabulary "
                                 f"holds {min(ids, default=0)} .. {self.size - 1})")
        unk = getattr(self.hf.model, "unk_token", None) or UNK   # [UNK] in WordPiece files
        self.unknown_id = self.hf.token_to_id(unk)
        self._eos = self.hf.token_to_id(EOS) if kind == "word" else None

    @property
    def stored(self) -> str:
        """What a data description keeps of it (DataInfo.vocab): its tokenizer.json."""
        return self.json

    def encode(self, text: str) -> np.ndarray:
        """Return the ids of `text` (int64); `word` appends `<eos>` at each line end.
        TokenizerError (one line) when the tokenizer cannot encode it."""
        try:
            return self._encode(text)
        except Exception as exc:  # the library raises its own Exception (a missing [UNK], ...)
            raise TokenizerError(f"the tokenizer cannot encode this text "
                                 f"({str(exc).splitlines()[0][:120] if str(exc) else exc!r})") from exc

    def _encode(self, text: str) -> np.ndarray:
        # line by line: encode_batch spreads the lines over the library's threads. Long
        # lines of a fitted tokenizer go as pieces that change no id (_pieces); a file's
        # tokenizer may strip or mark a piece's ends, so its lines go whole
        cut = _pieces if self.kind in TRAINED else lambda line: (line,)
        if self.kind != "word":
            pieces = [p for line in text.splitlines(keepends=True) for p in cut(line)]
            encoded = self.hf.encode_batch(pieces, add_special_tokens=False)
            return np.fromiter((i for e in encoded for i in e.ids), np.int64)
        pieces, ends = [], []
        lines = text.split("\n")
        for n, line in enumerate(lines):
            pieces.extend(cut(line))
            ends.extend([False] * (len(pieces) - len(ends) - 1))
            ends.append(n < len(lines) - 1)             # the text's last line has no "\n"
        out = []
        for enc, end in zip(self.hf.encode_batch(pieces, add_special_tokens=False), ends):
            out.extend(enc.ids)
            if end:
                out.append(self._eos)
        return np.asarray(out, np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of `ids`; `word` joins words with spaces, `<eos>` as a line end."""
        ids = [int(i) for i in ids]
        if self.kind != "word":
            return self.hf.decode(ids, skip_special_tokens=False)
        lines, words = [], []
        for i in ids:
            word = self.hf.id_to_token(i) or UNK
            if word == EOS:
                lines.append(" ".join(words))
                words = []
            else:
                words.append(word)
        return "\n".join([*lines, " ".join(words)])

    def stream(self, before: list[int] = ()) -> Callable[[int], str]:
        """Words one by one: a space before each but the first of a line."""
        if self.kind != "word":
            return super().stream(before)
        at_line_start = [not before or before[-1] == self._eos]

        def push(token: int) -> str:
            word = self.hf.id_to_token(token) or UNK
            if word == EOS:
                at_line_start[0] = True
                return "\n"
            text = word if at_line_start[0] else " " + word
            at_line_start[0] = False
            return text
        return push


def train_tokenizer(kind: str, lines: Iterable[str], *, vocab_size: int = 8192,
                    min_freq: int = 1, max_size: int | None = None) -> Tokenizer:
    """Return a `kind` tokenizer fitted on the training text given as `lines` (read once,
    streaming: a corpus never needs to be one string)."""
    if kind in BUILT_IN:
        if kind == "byte":
            return CharTokenizer("byte")
        chars: set[str] = set()
        for line in lines:
            chars.update(line)
        return CharTokenizer("char", "".join(sorted(chars)))
    from tokenizers import Regex, Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    if kind == "word":
        hf = HF(models.WordLevel(unk_token=UNK))
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        # WordLevelTrainer counts only; specials first, then words by frequency
        trainer = trainers.WordLevelTrainer(
            vocab_size=(max_size + 2) if max_size else 2**31 - 1, min_frequency=min_freq,
            special_tokens=[UNK, EOS], show_progress=False)
    elif kind == "bpe":
        hf = HF(models.BPE())
        # runs of LONGEST_RUN non-spaces (base64, DNA, minified code) become pieces of their
        # own first: BPE training time grows with the square of a piece's length
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(rf"\S{{{LONGEST_RUN}}}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        raise TokenizerError(f"unknown tokenizer {kind!r}; expected char, byte, word, bpe "
                             f"or a path to a tokenizer.json")
    hf.train_from_iterator(_lines(lines), trainer=trainer)
    return HFTokenizer(kind, hf.to_str())


def _lines(lines: Iterable[str]) -> Iterator[str]:
    """The lines without their ends (`<eos>` is added by encode, never learned from "\\n"),
    long ones in pieces: the trainer holds a batch of lines at once."""
    for line in lines:
        yield from _pieces(line.rstrip("\n"))


def _pieces(line: str) -> Iterator[str]:
    """`line` in pieces of LONGEST_LINE characters or so, so that a text without line ends
    (one line of 4M characters a chunk) takes no more memory than one with them. Each cut is
    just before a space followed by a non-space: WhitespaceSplit splits there anyway, and
    ByteLevel reads that space as the start of the next word, so no word or BPE piece, and
    no id, changes. A stretch with no such space runs on to the next one."""
    start, n = 0, len(line)
    while n - start > LONGEST_LINE:
        cut = line.rfind(" ", start + 1, start + LONGEST_LINE)
        while cut > start and line[cut + 1].isspace():  # inside a run of spaces: before its last
            cut = line.rfind(" ", start + 1, cut)
        if cut <= start:
            found = _WORD_START.search(line, start + LONGEST_LINE)
            if found is None:
                break
            cut = found.start()
        yield line[start:cut]
        start = cut
    yield line[start:]


_WORD_START = re.compile(r" (?=\S)")


def read_tokenizer_file(path) -> HFTokenizer:
    """Return the pretrained tokenizer a `tokenizer.json` file holds; TokenizerError (one
    line) for a file that is not one."""
    from ..files import FileRefused, read_text

    try:
        text = read_text(path, JSON_LIMIT)
    except (OSError, FileRefused, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from exc
    return HFTokenizer("file", text)


def kind_of(setting: str) -> str:
    """The kind a `data.tokenizer` setting names: a built-in name, or `file` for a path."""
    return setting if setting in BUILT_IN + TRAINED else "file"


def of(kind: str | None, vocab: str | None) -> Tokenizer:
    """Return the tokenizer a model was trained with, from its data description:
    (`char` | `byte`, the char vocabulary) or (`word` | `bpe` | `file`, tokenizer.json)."""
    if kind in BUILT_IN:
        return CharTokenizer(kind, vocab if kind == "char" else None)
    return _hf(kind, vocab)


@functools.lru_cache(maxsize=8)
def _hf(kind: str, json_text: str) -> HFTokenizer:
    # a description is asked for its tokenizer (and vocabulary size) often; parse it once
    return HFTokenizer(kind, json_text)

