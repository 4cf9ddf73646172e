"""How deqctl touches files it did not create.

Reading: only regular files, within a size budget, so a FIFO or /dev/zero named like a
data file cannot hang a command or exhaust memory.

Writing what a user names (`export --out`, `--plot`, `--json FILE`): into a temporary file
beside the target, moved into place only once complete, never replacing an existing file
without `--force`, and never a run's own files (its recipe, metrics, checkpoints), with
`--force` or without.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Iterator

MB = 2**20


class FileRefused(OSError):
    """A path that is not a regular file, or larger than its reader accepts; str() is one
    line naming it."""

    def __str__(self) -> str:
        return self.args[0]


class OutputError(ValueError):
    """An output path a user named cannot or must not be written; str() says why and
    what to do."""


def open_regular(path: str | Path) -> BinaryIO:
    """Open `path` for binary reading if it is a regular file (symlinks followed);
    FileRefused otherwise. Opening never blocks: a FIFO is refused, not waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileRefused(f"{path}: not a regular file (a FIFO, device or socket)")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; FileRefused otherwise."""
    with open_regular(path) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise FileRefused(f"{path}: larger than {_size(limit)}, more than a file of its "
                          f"kind can hold; not read")
    return data


def read_text(path: str | Path, limit: int) -> str:
    """As read_bytes, decoded as UTF-8 (UnicodeDecodeError for other bytes)."""
    return read_bytes(path, limit).decode("utf-8")


def read_json(path: str | Path, limit: int) -> Any:
    """The JSON document in a regular file of at most `limit` bytes; ValueError (one line)
    for invalid or too deeply nested JSON, FileRefused for what read_bytes refuses."""
    data = read_bytes(path, limit)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def is_regular(path: str | Path) -> bool:
    """True for a regular file (symlinks followed), without opening it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _size(n: int) -> str:
    return f"{n / MB:.0f} MB" if n >= MB else f"{n} bytes"


def free_name(folder: Path, stem: str, suffix: str = "") -> Path:
    """folder/STEM+SUFFIX if nothing is there, else the first free STEM-2+SUFFIX,
    STEM-3+SUFFIX, ...: a name to move something aside to without replacing anything."""
    k = 1
    while True:
        candidate = Path(folder) / (f"{stem}{suffix}" if k == 1 else f"{stem}-{k}{suffix}")
        if not os.path.lexists(candidate):
            return candidate
        k += 1


@contextlib.contextmanager
def replacing(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` (a file deqctl owns) that replaces it in one step
    once the block ends without an error: a crash leaves the old content or the new, never
    a cut-off file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` (a file deqctl owns) by `text` in one step (see `replacing`)."""
    with replacing(path) as fh:
        fh.write(text)


@dataclass
class Output:
    """A file a user asked a command to write. `check()` before the work, so a refusal
    costs nothing; `writing()` at the end gives the temporary path to write to and moves
    it into place once the block completes.

    `reading` are the paths the command reads from: never an output either; `folders`
    are folders it reads (run directories, a sweep's folder): nothing inside them is.
    """

    path: Path
    force: bool = False
    option: str = "--out"
    reading: tuple[Path, ...] = field(default_factory=tuple)
    folders: tuple[Path, ...] = field(default_factory=tuple)

    def check(self) -> "Output":
        """Raise OutputError (one line) unless the path may be written; returns self."""
        p, say = Path(self.path), self.option
        if p.is_dir():
            raise OutputError(f"{say} {p}: is a folder; name a file to write")
        owner = owner_of(p, self.reading)
        if owner is not None:
            raise OutputError(f"{say} {p}: belongs to {owner}, which this command reads or "
                              f"which is a run's own file (recipe, metrics, checkpoints); "
                              f"write somewhere else (--force does not apply)")
        holder = folder_holding(p, self.folders)
        if holder is not None:
            raise OutputError(f"{say} {p}: inside {holder}, which this command reads; "
                              f"write somewhere else (--force does not apply)")
        if os.path.lexists(p) and not (p.is_file() or p.is_symlink() and not p.exists()):
            raise OutputError(f"{say} {p}: exists and is not a regular file (a device, FIFO "
                              f"or socket); deqctl replaces only files")
        if os.path.lexists(p) and not self.force:
            raise OutputError(f"{say} {p}: exists; pass --force to replace it")
        parent = next(a for a in [p.parent, *p.parent.parents] if a.exists())
        if not parent.is_dir():
            raise OutputError(f"{say} {p}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{say} {p}: cannot write into {parent} (permission denied)")
        return self

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """Yield a temporary path beside the target (same suffix); after the block, move
        it into place. Nothing is left behind when the block fails."""
        p = Path(self.path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.option} {p}: cannot create {p.parent} "
                              f"({exc.strerror or exc})") from None
        tmp = p.with_name(f".{p.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp{p.suffix}")
        try:
            yield tmp
            self._place(tmp, p)
        except PermissionError as exc:
            raise OutputError(f"{self.option} {p}: permission denied ({exc.filename})") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _place(self, tmp: Path, p: Path) -> None:
        if self.force:
            if p.is_dir():
                raise OutputError(f"{self.option} {p}: is a folder; name a file to write")
            os.replace(tmp, p)
            return
        try:
            os.link(tmp, p)            # atomic, and fails if anything took the name meanwhile
        except FileExistsError:
            raise OutputError(f"{self.option} {p}: appeared while this command ran; not "
                              f"replaced (pass --force to replace it)") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            # no hard links on this filesystem: claim the name, then move over the claim
            try:
                os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                raise OutputError(f"{self.option} {p}: appeared while this command ran; "
                                  f"not replaced (pass --force to replace it)") from None
            os.replace(tmp, p)


def check_outputs(outputs: list[Output]) -> list[Output]:
    """Each output checked, and no two naming one file; returns them."""
    seen: dict[str, str] = {}
    for out in outputs:
        out.check()
        key = os.path.realpath(out.path)
        if key in seen:
            raise OutputError(f"{seen[key]} and {out.option} both name {out.path}")
        seen[key] = out.option
    return outputs


def owner_of(path: Path, reading: tuple[Path, ...] = ()) -> Path | None:
    """The run directory, checkpoint or input file that `path` is part of, when writing
    there would damage it; None for any other path."""
    from .engine.rundir import RUN_ENTRIES, is_checkpoint, is_run

    p = Path(os.path.abspath(path))
    real = p.resolve()
    for source in reading:
        if real == Path(source).resolve():
            return Path(source)
    for where in (p, real):
        for folder in where.parents:
            if is_checkpoint(folder):
                return folder
            if is_run(folder):
                first = where.relative_to(folder).parts[0]
                if first in RUN_ENTRIES or first.startswith("recipe."):
                    return folder
    return None


def folder_holding(path: Path, folders: tuple[Path, ...]) -> Path | None:
    """The first of `folders` that `path` lies inside (as spelled, or once symlinks are
    resolved: replacing a link inside a folder changes the folder too); None if none."""
    spelled = Path(os.path.abspath(path))
    places = (spelled, Path(os.path.realpath(path)))
    for folder in folders:
        roots = {Path(os.path.abspath(folder)), Path(os.path.realpath(folder))}
        if any(root == p or root in p.parents for root in roots for p in places):
            return folder
    return None


def glob_paths(pattern: str, limit: int) -> list[str]:
    """The paths matching a shell pattern (`*`, `?`, `[...]` within a name, `**` any
    number of folders), sorted and spelled as glob.glob(pattern, recursive=True) spells
    them (but for `DIR/**`, which leaves DIR itself out); a `**` enters each real folder
    once, so a symlink loop is not followed round and round, and FileRefused (one line)
    once more than `limit` folder entries were looked at (a pattern over /proc, a disk)."""
    parts = pattern.split("/")
    first = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))
    if first == len(parts):
        return [pattern] if os.path.lexists(pattern) else []
    base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "")
    walk = _Walk(base or ".", limit)
    return sorted(walk.match(base, [p for p in parts[first:] if p]))


def files_below(folder: Path, limit: int) -> list[Path]:
    """Every regular file under `folder`, hidden ones too (symlinked folders followed,
    each real folder entered once), in no particular order; FileRefused (one line) once
    more than `limit` folder entries were looked at."""
    walk = _Walk(str(folder), limit)
    return [Path(p) for p in walk.below(str(folder), hidden=True) if is_regular(p)]


class _Walk:
    """Folders walked within one budget of entries looked at, from `root` (named in the
    refusal)."""

    def __init__(self, root: str, limit: int):
        self.root, self.limit, self.seen = root, limit, 0

    def match(self, base: str, parts: list[str]) -> Iterator[str]:
        """The paths under `base` matching the pattern's remaining `parts`."""
        if not parts:
            yield base
            return
        head, rest = parts[0], parts[1:]
        if head == "**":                  # this folder and every one below, each once
            for folder in [base, *self.below(base, hidden=False, files=not rest)]:
                if rest:
                    yield from self.match(folder, rest)
                elif folder != base:
                    yield folder
            return
        if not glob.has_magic(head):
            path = os.path.join(base, head)
            if os.path.lexists(path) and (not rest or os.path.isdir(path)):
                yield from self.match(path, rest)
            return
        for entry in self.entries(base):
            hidden_ok = not entry.name.startswith(".") or head.startswith(".")
            if hidden_ok and fnmatch.fnmatchcase(entry.name, head) and (
                    not rest or _is_dir(entry)):
                yield from self.match(os.path.join(base, entry.name), rest)

    def below(self, base: str, hidden: bool, files: bool = True) -> Iterator[str]:
        """Every folder (and with `files`, every other entry) under `base`, depth first;
        a folder reached again by another path (a symlink, a loop) is not entered again."""
        visited = {_identity(base)}
        stack = [base]
        while stack:
            folder = stack.pop()
            for entry in sorted(self.entries(folder), key=lambda e: e.name, reverse=True):
                if not hidden and entry.name.startswith("."):
                    continue
                path = os.path.join(folder, entry.name)
                if not _is_dir(entry):
                    if files:
                        yield path
                    continue
                key = _identity(path)
                if key in visited:
                    continue
                visited.add(key)
                yield path
                stack.append(path)

    def entries(self, folder: str) -> list[os.DirEntry]:
        """The entries of `folder` (none when it cannot be listed), each counted."""
        out: list[os.DirEntry] = []
        try:
            with os.scandir(folder or ".") as listing:
                for entry in listing:
                    out.append(entry)
                    if self.seen + len(out) > self.limit:
                        break
        except OSError:
            pass                          # gone, not a folder, or not ours to list
        self.seen += len(out)
        if self.seen > self.limit:
            raise FileRefused(f"{self.root}: more than {self.limit} files and folders to "
                              f"look through; name a smaller folder or a narrower pattern")
        return out


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()             # symlinks followed: a linked folder is walked
    except OSError:
        return False


def _identity(path: str) -> tuple[int, int] | str:
    try:
        st = os.stat(path or ".")
        return st.st_dev, st.st_ino
    except OSError:
        return path
