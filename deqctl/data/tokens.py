"""Token files: a text split tokenized once into a flat file of uint16 (or uint32) ids,
cached by content, and read as training sequences from the file (a `numpy.memmap` of it
stands for the ids; each sequence is one positional read), so memory does not grow with
the corpus.

    cache = TokenCache.at(cfg.root)
    tok = cache.tokenizer(settings, train_text)     # fitted once per (text, settings)
    ids = cache.tokens(tok, test_text)              # a read-only memmap of the split's ids
    split = Split(*windows(ids, seq_len))

A text is a `Text`: a fingerprint of its content and a way to read it again as chunks of
whole lines (never one string). A cache entry's name is a hash of the fingerprint and the
tokenizer; it is written to a temporary file, checked and renamed, with its description
(`.json`: count, dtype, sha256 of the ids) written last, so a reader never sees half a
file, and two runs preparing the same data at once do it once (an flock). An entry whose
size or hash no longer matches its description is rebuilt.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .. import progress
from ..files import is_regular, open_regular, read_json, replacing, write_atomic
from .base import DataError
from .tokenize import Tokenizer, of, train_tokenizer

FORMAT = "deqctl-tokens/2"
CHUNK_CHARS = 1 << 22          # encode about 4M characters at a time: bounded memory
HASH_BLOCK = 1 << 24
IN_MEMORY_TOKENS = 1 << 21     # a split this small is held as tensors (32 MB at most)


@dataclass(frozen=True)
class Text:
    """A split's text: `fingerprint` names its content; `chunks()` reads it again as
    strings of whole lines, in order, each of about CHUNK_CHARS characters at most;
    `size` is its UTF-8 bytes when known (what progress is measured against)."""

    name: str
    fingerprint: str
    chunks: Callable[[], Iterator[str]]
    size: int | None = None


def text_file(path: Path, label: str) -> Text:
    """A UTF-8 file as a Text, fingerprinted by the sha256 of its bytes; `label` names it
    in errors (DataError: not UTF-8)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_BLOCK), b""):
            digest.update(block)

    def chunks() -> Iterator[str]:
        try:
            with open(path, encoding="utf-8", newline="") as fh:
                yield from _read_chunks(fh)
        except UnicodeDecodeError as exc:
            raise DataError(f"{label} is not UTF-8 text") from exc
    return Text(label, "sha256:" + digest.hexdigest(), chunks, path.stat().st_size)


def _read_chunks(fh) -> Iterator[str]:
    """A text file as chunks of about CHUNK_CHARS characters, each cut after its last line
    end (else before its last space; else anywhere), so one huge line is never one
    string, and a cut lands where every tokenizer splits anyway."""
    rest = ""
    while block := fh.read(CHUNK_CHARS):
        text = rest + block
        cut = text.rfind("\n") + 1 or max(text.rfind(" "), 0) or len(text)
        yield text[:cut]
        rest = text[cut:]
    if rest:
        yield rest


def text_rows(name: str, fingerprint: str, rows: Callable[[], Iterable[str]]) -> Text:
    """Rows of text (a dataset column) as one Text: rows that end their own lines
    (wikitext) are kept as they are, others are joined by a newline."""
    def chunks() -> Iterator[str]:
        yield from _line_chunks(_as_lines(rows()))
    return Text(name, fingerprint, chunks)


def _as_lines(rows: Iterable[str]) -> Iterator[str]:
    ends_line = True
    for row in rows:
        if row:
            if not ends_line:
                yield "\n"
            yield row
            ends_line = row.endswith("\n")


def _line_chunks(lines: Iterable[str]) -> Iterator[str]:
    """Concatenate rows into chunks of about CHUNK_CHARS characters cut after a line end."""
    parts, size = [], 0
    for line in lines:
        parts.append(line)
        size += len(line)
        if size >= CHUNK_CHARS and line.endswith("\n"):
            yield "".join(parts)
            parts, size = [], 0
    if parts:
        yield "".join(parts)


def text_size(text: Text) -> int:
    """`text`'s UTF-8 bytes: its size when known, else read once (rows of a dataset; cheap
    beside fitting a tokenizer on them)."""
    if text.size is not None:
        return text.size
    return sum(len(chunk.encode("utf-8")) for chunk in text.chunks())


def sample_chunks(text: Text, sample: float | None, size: int | None = None
                  ) -> Iterator[str]:
    """`text`'s chunks, or about `sample` bytes of them taken evenly across it (`size`
    bytes in all: text.size, else read once to learn it): a chunk is kept while the kept
    bytes trail the sample's share of those read so far."""
    if sample is not None and size is None:
        size = text_size(text)
    if sample is None or size <= sample:
        yield from text.chunks()
        return
    kept = read = 0
    for chunk in text.chunks():
        nbytes = len(chunk.encode("utf-8"))
        read += nbytes
        if kept < sample * read / size:
            kept += nbytes
            yield chunk


def _lines(chunks: Iterable[str], advance: Callable[[int], None]) -> Iterator[str]:
    for chunk in chunks:
        yield from chunk.splitlines(keepends=True)
        advance(len(chunk.encode("utf-8")))


class TokenCache:
    """A folder of token files and fitted tokenizers."""

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def at(cls, root: str | None) -> TokenCache:
        """The cache under `root` (data.root), else $DEQCTL_CACHE, else
        $XDG_CACHE_HOME/deqctl (~/.cache/deqctl)."""
        base = Path(root).expanduser() if root else Path(os.environ.get("DEQCTL_CACHE") or (
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deqctl"))
        folder = base / "tokens"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"token cache {folder}: cannot create it ({exc.strerror}); set "
                            f"data.root or DEQCTL_CACHE to a writable folder") from exc
        return cls(folder)

    # -- tokenizers ------------------------------------------------------------------------
    def tokenizer(self, kind: str, train: Text, sample: float | None = None,
                  **settings) -> Tokenizer:
        """The `kind` tokenizer fitted on `train` (on about `sample` bytes of it, spread
        over it, when given) with `settings`, from the cache when fitted before (training a
        BPE on a large corpus takes minutes)."""
        size = text_size(train) if sample is not None else train.size
        if sample is not None and size <= sample:
            sample = None                           # all of it: the same fit, the same key
        key = _key({"kind": kind, "settings": settings, "text": train.fingerprint,
                    **({"sample": sample} if sample else {})})
        path = self.folder / f"{key}.tokenizer.json"
        with self._lock(key):
            try:        # anything but a readable tokenizer of this kind is fitted again
                stored = read_json(path, 2**27)
                tok = of(stored["kind"], stored["vocab"])
                if tok.kind == kind:
                    return tok
            except (OSError, ValueError, TypeError, KeyError):
                pass
            what = f"a {sample / 2**20:,.0f} MB sample of {train.name}" if sample else train.name
            with progress.tracked(f"fitting the {kind} tokenizer on {what}",
                                  sample or train.size) as advance:
                tok = train_tokenizer(kind, _lines(sample_chunks(train, sample, size), advance),
                                      **settings)
            self._write(lambda: write_atomic(path, json.dumps({"kind": tok.kind,
                                                               "vocab": tok.stored})))
        return tok

    # -- token files ----------------------------------------------------------------------
    def tokens(self, tok: Tokenizer, text: Text) -> tuple[np.ndarray, dict]:
        """The ids of `text` as a read-only memmap, and the entry's description (count,
        unknown, bytes of text, path, seconds it took to build; `built` when it was)."""
        key = _key({"format": FORMAT, "tokenizer": [tok.kind, tok.stored],
                    "text": text.fingerprint})
        path, meta_path = self.folder / f"{key}.ids", self.folder / f"{key}.json"
        with self._lock(key):
            meta = _valid(path, meta_path)
            if meta is None:
                meta = self._write(lambda: _build(tok, text, path, meta_path))
        meta["path"] = str(path)
        dtype = np.dtype(meta["dtype"])
        ids = (np.memmap(path, dtype=dtype, mode="r") if meta["count"]
               else np.zeros(0, dtype))
        return ids, meta

    @contextlib.contextmanager
    def _lock(self, key: str):
        """Hold KEY.lock: one process builds an entry, the others wait, then reuse it. A
        cache that cannot be written (read-only) is still read, without the lock."""
        try:
            fd = os.open(self.folder / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o644)
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise self._error(exc) from exc
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            for stale in self.folder.glob(f".{key}.*.tmp"):  # a builder killed before us
                stale.unlink(missing_ok=True)
            yield
        finally:
            os.close(fd)

    def _write(self, build: Callable[[], Any]) -> Any:
        """Run `build`, a write into the cache; one line naming the folder when it fails."""
        try:
            return build()
        except OSError as exc:
            raise self._error(exc) from exc

    def _error(self, exc: OSError) -> DataError:
        return DataError(f"token cache {self.folder}: {exc.strerror or exc} "
                         f"({getattr(exc, 'filename', None) or ''}); set data.root or "
                         f"DEQCTL_CACHE to a writable folder")


def _key(what: dict) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def _valid(path: Path, meta_path: Path) -> dict | None:
    """The description of a complete, unaltered entry; None when it is missing, cut off,
    edited (its size or the sha256 of its ids differ from what was written) or not a
    regular file."""
    try:
        meta = read_json(meta_path, 2**20)
        dtype = np.dtype(meta["dtype"])
        if meta.get("format") != FORMAT or not is_regular(path) or \
                path.stat().st_size != meta["count"] * dtype.itemsize:
            return None
        return meta if _sha256(path) == meta["sha256"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build(tok: Tokenizer, text: Text, path: Path, meta_path: Path) -> dict:
    """Tokenize `text` chunk by chunk into `path` (atomically), then describe it."""
    dtype = np.dtype(np.uint16 if tok.size <= 2**16 else np.uint32)
    started, count, unknown, size, words = time.perf_counter(), 0, 0, 0, 0
    digest = hashlib.sha256()
    with replacing(path, "wb") as out, progress.tracked(f"tokenizing {text.name}",
                                                        text.size) as advance:
        for chunk in text.chunks():
            ids = tok.encode(chunk)
            unknown += tok.unknown_in(ids)
            raw = chunk.encode("utf-8")
            size, words = size + len(raw), words + count_words(raw)
            data = ids.astype(dtype).tobytes()
            digest.update(data)
            out.write(data)
            count += len(ids)
            advance(len(raw))
    meta = {"format": FORMAT, "dtype": dtype.name, "count": count, "unknown": unknown,
            "bytes": size, "words": words, "sha256": digest.hexdigest(), "text": text.name,
            "seconds": round(time.perf_counter() - started, 3)}
    write_atomic(meta_path, json.dumps(meta))
    return {**meta, "built": True}


_SPACE = np.zeros(256, dtype=bool)
_SPACE[list(b" \t\n\r\x0b\x0c")] = True


def count_words(raw: bytes) -> int:
    """Words as the `word` tokenizer counts them: runs of non-whitespace, plus one per
    line end (its <eos>). Chunks are cut at whitespace, so counts of chunks add up."""
    space = _SPACE[np.frombuffer(raw, dtype=np.uint8)]
    starts = int(np.count_nonzero(~space[1:] & space[:-1])) + int(space.size > 0 and not space[0])
    return starts + raw.count(b"\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as fh:       # a FIFO put in its place is refused, not waited on
        for block in iter(lambda: fh.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class TokenWindows:
    """Rows of a token file read as they are indexed: row i holds ids[i*L + shift :
    i*L + shift + L] (shift 0: inputs, 1: next-token targets). Indexing (indices or a
    slice) reads them into an int64 tensor; `rows_view` selects rows without reading."""

    dtype = torch.int64

    def __init__(self, ids: np.ndarray, seq_len: int, shift: int, rows: range | None = None):
        self.ids, self.seq_len, self.shift = ids, seq_len, shift
        self.rows = rows if rows is not None else range((len(ids) - 1) // seq_len)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), self.seq_len))

    def dim(self) -> int:
        return 2

    def __len__(self) -> int:
        return len(self.rows)

    def rows_view(self, part: slice) -> TokenWindows:
        """Rows `part` of these, still unread."""
        return TokenWindows(self.ids, self.seq_len, self.shift, self.rows[part])

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            index = np.arange(len(self.rows))[index]
        at = np.asarray(index, dtype=np.int64).reshape(-1)
        if at.size and (at.min() < -len(self.rows) or at.max() >= len(self.rows)):
            raise IndexError(f"row index out of range for {len(self.rows)} rows")
        rows = self.rows.start + (at % max(1, len(self.rows))) * self.rows.step
        out = torch.from_numpy(self._read(rows * self.seq_len + self.shift).astype(np.int64))
        return out[0] if isinstance(index, int) else out

    def _read(self, starts: np.ndarray) -> np.ndarray:
        """The (len(starts), seq_len) ids from each start. From a token file, one positional
        read each: a page the memmap touches stays mapped and counts as this process's
        memory, with the ~16 neighbours the kernel maps around it (240 MiB of a 354 MiB
        file after 200 batches of 16), so reading through it grows with the corpus."""
        if not isinstance(self.ids, np.memmap):
            return self.ids[starts[:, None] + np.arange(self.seq_len)]
        dtype = self.ids.dtype
        size = self.seq_len * dtype.itemsize
        out = np.empty((len(starts), self.seq_len), dtype)
        with open(self.ids.filename, "rb", buffering=0) as fh:
            for row, start in zip(out, starts.tolist()):
                got = os.pread(fh.fileno(), size, self.ids.offset + start * dtype.itemsize)
                if len(got) != size:
                    raise DataError(f"{self.ids.filename}: cut short while training (a "
                                    f"sequence at id {start} is past its end)")
                row[:] = np.frombuffer(got, dtype)
        return out


def windows(ids: np.ndarray, seq_len: int, where: str
            ) -> tuple[torch.Tensor | TokenWindows, torch.Tensor | TokenWindows]:
    """(inputs, next-token targets) of a token file cut into sequences of `seq_len`: every
    id but the first is predicted once; the last partial sequence is dropped. Up to
    IN_MEMORY_TOKENS ids they are int64 tensors (the fast path); beyond, rows of the file."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise DataError(f"{where}: {len(ids)} tokens, fewer than data.seq_len + 1 = "
                        f"{seq_len + 1}")
    if len(ids) > IN_MEMORY_TOKENS:
        return TokenWindows(ids, seq_len, 0), TokenWindows(ids, seq_len, 1)
    flat = torch.from_numpy(np.asarray(ids[:n * seq_len + 1], dtype=np.int64))
    return flat[:-1].view(n, seq_len).clone(), flat[1:].view(n, seq_len).clone()
