"""Any Hugging Face dataset: a hub name (downloaded, or read from the cache offline) or a
folder written by `save_to_disk`. A text column makes a language-modelling bundle; an
image column with a label column an image-classification bundle."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field

from ..errors import quote
from ..options import Block, Int
from .base import DataBundle, DataError, DataInfo
from .arrays import MAX_CLASSES
from .images import lazy_bundle, lazy_splits
from .registry import source
from .settings import Augment, TextTokens
from .text import lm_bundle
from .tokens import Text, text_rows


class HfSource(Block):
    path: str | None = Field(None, description="hub name (e.g. wikitext) or a folder "
                             "written by save_to_disk")
    config: str | None = None
    train_split: str = "train"
    val_split: str | None = None
    test_split: str = "test"
    text_column: str | None = Field(None, description="a text dataset: its column")
    image_column: str | None = Field(None, description="an image dataset: its columns")
    label_column: str | None = None


class HfData(TextTokens):
    """Any Hugging Face dataset: text (language modelling) or image + label (classification)."""

    hf: HfSource = HfSource()
    image_size: Int | None = Field(None, ge=4)
    augment: Augment = Field(False, description="images: true (shifts, + flips for colour) "
                             "or imagenet (RandomResizedCrop + flip; Resize + CenterCrop)")
    workers: Int = Field(0, ge=0, le=256, description="images: DataLoader worker processes "
                         "that decode them (0: in the main process)")

TEXT_COLUMNS = ("text", "content", "sentence")
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")


def _open(src, cache_dir: str | None) -> Any:
    """Return the DatasetDict of data.hf.path (a save_to_disk folder or a hub name)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:        # the hub's retries are logged line by line: the failure is said once, below
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.set_verbosity_error()
    except ImportError:
        pass
    folder = Path(src.path).expanduser()
    try:
        if folder.is_dir():
            ds = datasets.load_from_disk(str(folder))
        else:
            with _offline_unless_reachable():
                ds = datasets.load_dataset(src.path, src.config, cache_dir=cache_dir)
    except FileNotFoundError as exc:
        raise DataError(f"data.hf.path: {src.path} not found ({str(exc).splitlines()[0][:160]})") from None
    except Exception as exc:   # hub, network and format errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"data.hf.path: cannot load {quote(src.path)} ({first}); offline, only "
                        f"datasets already in the cache (data.root) or saved with "
                        f"save_to_disk can be read") from None
    if isinstance(ds, datasets.Dataset):
        raise DataError(f"data.hf.path: {src.path} holds a single split; save a DatasetDict "
                        f"with train and test splits")
    return ds


PROBE_SECONDS = 3.0


def _hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether the hub's endpoint ($HF_ENDPOINT, through any proxy) answers at all within
    `timeout` seconds; any HTTP answer counts. Without this, an unreachable hub costs the
    client's five retries (~25 s of silence) before its error. The request runs in a thread:
    a name lookup has no timeout of its own."""
    import threading

    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    answered = threading.Event()

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout, follow_redirects=False)
            answered.set()
        except Exception:  # any failure to get an answer: DNS, refused, TLS, timeout
            pass
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return answered.is_set()


@contextlib.contextmanager
def _offline_unless_reachable() -> Iterator[None]:
    """Read the hub in offline mode (only datasets already in the cache; a request fails at
    once) while it does not answer; both libraries read the flag when they make a request."""
    import datasets.config
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE or _hub_reachable():
        yield
        return
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _pick(given: str | None, candidates: tuple[str, ...], columns: list[str]) -> str | None:
    if given is not None:
        return given
    return next((c for c in candidates if c in columns), None)


@source("hf", HfData)
def load_hf(cfg, like: DataInfo | None = None) -> DataBundle:
    """Return the splits data.hf.{train,val,test}_split of data.hf.path as a bundle."""
    src = cfg.hf
    if src.path is None:
        raise DataError("data.hf.path: required for hf (e.g. wikitext, or a save_to_disk folder)")
    ds = _open(src, cfg.root)
    wanted = {"train": src.train_split, "test": src.test_split}
    if src.val_split is not None:
        wanted["val"] = src.val_split
    if like is not None and src.train_split not in ds:
        del wanted["train"]      # evaluating a trained model: no training split needed
    for part, split in wanted.items():
        if split not in ds:
            raise DataError(f"data.hf.{part}_split: {quote(split)} not in {src.path} "
                            f"(splits: {', '.join(ds)})")
    columns = list(ds[wanted["test"]].column_names)
    text = _pick(src.text_column, TEXT_COLUMNS, columns) if src.image_column is None else None
    image = _pick(src.image_column, IMAGE_COLUMNS, columns) if text is None else None
    label = _pick(src.label_column, LABEL_COLUMNS, columns)
    for key, col in (("text_column", text), ("image_column", image),
                     ("label_column", label if image else None)):
        if col is not None and col not in columns:
            raise DataError(f"data.hf.{key}: {quote(col)} not in {src.path} (columns: {', '.join(columns)})")
    name = f"hf:{src.path}" + (f"/{src.config}" if src.config else "")
    if text is not None:
        texts = {part: _text(ds[split], text, f"{name} {split}") for part, split in wanted.items()}
        return lm_bundle(name, texts, cfg, like)
    if image is not None and label is not None:
        return _images(name, ds, wanted, image, label, cfg, like)
    raise DataError(f"data.hf: cannot tell what {src.path} holds; set data.hf.text_column "
                    f"(language modelling) or data.hf.image_column and data.hf.label_column "
                    f"(columns: {', '.join(columns)})")


def _text(dataset, column: str, name: str) -> Text:
    """A text column as one Text, read in batches of rows (empty and missing rows skipped),
    fingerprinted by the dataset's own fingerprint (its content and transforms)."""
    def rows() -> Iterator[str]:
        for batch in dataset.iter(batch_size=1024):
            for row in batch[column]:
                if row is not None and not isinstance(row, str):
                    raise DataError(f"data.hf.text_column: {quote(column)} in {name} does "
                                    f"not hold text")
                yield row or ""
    fingerprint = getattr(dataset, "_fingerprint", None) or f"{name}:{len(dataset)}"
    return text_rows(name, f"hf:{fingerprint}:{column}", rows)


def _class_id(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_CLASSES


def _images(name: str, ds, wanted: dict[str, str], image: str, label: str, cfg,
            like: DataInfo | None) -> DataBundle:
    """Image + label columns as splits of undecoded rows (decoded as they are used)."""
    from .loader import HfRows

    refs, targets = {}, {}
    for part, split in wanted.items():
        feature = ds[split].features.get(image)
        if type(feature).__name__ != "Image":
            raise DataError(f"data.hf.image_column: {quote(image)} in {split} does not hold images")
        labels = ds[split][label]
        bad = next((i for i, v in enumerate(labels) if not _class_id(v)), None)
        if bad is not None:
            raise DataError(f"data.hf.label_column: {quote(label)} in {split} holds "
                            f"{quote(labels[bad])} at row {bad}, not a class id in 0 .. "
                            f"{MAX_CLASSES - 1} (an unlabelled split?)")
        refs[part], targets[part] = HfRows(ds[split], image, f"{name} {split}"), labels
    splits = lazy_splits(refs, targets, cfg, name)
    if like is not None and "train" not in splits:   # evaluating: the model knows the rest
        return DataBundle(info=like, train=None, test=splits["test"], val=splits.get("val"))
    feature = ds[wanted["train"]].features.get(label)
    classes = getattr(feature, "num_classes", None) or int(
        max(int(s.targets.max()) for s in splits.values())) + 1
    names = tuple(getattr(feature, "names", None) or ())
    return lazy_bundle(name, splits, classes, names if len(names) == classes else ())
