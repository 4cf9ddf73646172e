"""Every data source on small files generated here (or the embedded data): what it yields,
what it describes, and the one-line error for each bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deqctl import recipe as recipes
from deqctl.data import DataError, Tokenizer, build_data, iterate_batches
from deqctl.data.series import parse_time


def data(**kw):
    return recipes.validate({"data": kw}).data


def one_line_error(**kw) -> str:
    with pytest.raises(DataError) as err:
        build_data(data(**kw))
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# --- text ------------------------------------------------------------------------------


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "train.txt").write_text("abcab\ncab" * 20, encoding="utf-8")
    (tmp_path / "test.txt").write_text("abzzc" * 10, encoding="utf-8")
    (tmp_path / "val.txt").write_text("cabcabcab", encoding="utf-8")
    return tmp_path


def test_text_files_become_next_token_sequences(texts):
    b = build_data(data(name="text", seq_len=8, files={"train": str(texts / "train.txt"),
                                                       "val": str(texts / "val.txt"),
                                                       "test": str(texts / "test.txt")}))
    info = b.info
    assert (info.task, info.inputs, info.shape, info.tokenizer) == ("lm", "tokens", (8,), "char")
    assert info.vocab == "\nabc" and info.vocab_size == 5          # 0 is the unknown id
    tok = Tokenizer.of(info)
    text = ("abcab\ncab" * 20)
    n = (len(text) - 1) // 8
    assert b.train.inputs.shape == (n, 8) and b.train.inputs.dtype == torch.int64
    assert tok.decode(b.train.inputs[0]) == text[:8]
    # targets are the inputs shifted by one token, across sequence boundaries too
    stream = torch.cat([b.train.inputs.flatten(), b.train.targets[-1, -1:]])
    assert torch.equal(b.train.targets.flatten(), stream[1:])
    # 'z' is not in the training text: unknown id 0, counted and reported
    assert b.facts["unknown_tokens"] == {"train": 0, "val": 0, "test": 20}
    assert (b.test.inputs == 0).sum() + (b.test.targets[-1, -1] == 0) >= 18
    assert any("20 character(s) of the test text" in note for note in b.notes)
    assert len(b.val) == 1


def test_byte_tokenizer_reads_any_utf8(tmp_path):
    (tmp_path / "t.txt").write_text("héllo wörld " * 5, encoding="utf-8")
    b = build_data(data(name="text", tokenizer="byte", seq_len=4,
                        files={"train": str(tmp_path / "t.txt"), "test": str(tmp_path / "t.txt")}))
    assert b.info.vocab_size == 256 and b.info.vocab is None
    assert Tokenizer.of(b.info).decode(b.train.inputs[:2].flatten()) == "héllo w"[:7]
    assert b.facts["unknown_tokens"]["test"] == 0


def test_a_trained_vocabulary_tokenizes_other_text(texts):
    trained = build_data(data(name="text", seq_len=8, files={"train": str(texts / "train.txt"),
                                                             "test": str(texts / "test.txt")}))
    other = build_data(data(name="text", seq_len=8, files={"test": str(texts / "val.txt")}),
                       like=trained.info)
    assert other.train is None and other.info.vocab == trained.info.vocab
    with pytest.raises(DataError, match="data.files.train: required to train"):
        build_data(data(name="text", files={"test": str(texts / "val.txt")}))


@pytest.mark.parametrize("files, needle", [
    ({"train": "missing.txt", "test": "missing.txt"}, "data.files.train: "),
    ({"train": "BIN", "test": "BIN"}, "not UTF-8"),
    ({"train": "SHORT", "test": "SHORT"}, "fewer than data.seq_len + 1"),
])
def test_text_errors(tmp_path, files, needle):
    (tmp_path / "BIN").write_bytes(b"\xff\xfe\x00abc" * 10)
    (tmp_path / "SHORT").write_text("abc")
    files = {k: str(tmp_path / v) for k, v in files.items()}
    assert needle in one_line_error(name="text", seq_len=8, files=files)


def test_shakespeare_is_embedded_and_char_level():
    b = build_data(data(name="shakespeare", seq_len=256))
    assert b.info.name == "shakespeare" and b.info.vocab_size == 77     # 76 characters + unknown
    assert len(b.train) == (1055110 - 1) // 256 and b.val is not None
    # The Merchant of Venice has digits Hamlet & co. lack
    assert b.facts["unknown_tokens"]["test"] > 0 and b.facts["unknown_tokens"]["train"] == 0


# --- csv / co2 -------------------------------------------------------------------------


def write_csv(path, rows, header="t,a,b"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture
def series_csv(tmp_path):
    # 60 rows, two channels; out of order in the file; gaps in train and in test
    rows = [f"{2000 + i},{i if i not in (5, 6) else ''},{100 + 2 * i if i != 55 else ''}"
            for i in range(60)]
    return write_csv(tmp_path / "s.csv", rows[30:] + rows[:30])


def test_csv_windows_gaps_and_scaling(series_csv):
    b = build_data(data(name="csv", path=str(series_csv), time_column="t", columns=["a", "b"],
                        window=8, horizon=3, season=4, test_fraction=0.2, val_fraction=0.1))
    info = b.info
    assert (info.task, info.shape, info.target_shape, info.season) == ("forecast", (8, 2), (3, 2), 4)
    assert info.columns == ("a", "b") and info.baselines
    # sorted by time; input gaps carry the last value, target gaps are interpolated: the
    # series is exactly a = i, b = 100 + 2i
    x, y = b.train.inputs[0], b.train.targets[0]
    assert x[:, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 7]
    assert torch.equal(y[:, 0], torch.arange(8.0, 11)) and torch.equal(y[:, 1], 100 + 2 * torch.arange(8.0, 11))
    assert b.facts["gaps_interpolated"] == {"train": 2, "val": 0, "test": 1}
    # rows: train 0..41, val 42..47, test 48..59; scaling from the train rows only
    assert info.mean == pytest.approx((20.5, 141.0))
    assert len(b.train) == 42 - 8 - 3 + 1 and len(b.val) == 6 - 3 + 1 and len(b.test) == 12 - 3 + 1
    assert float(b.test.targets[:, :, 0].min()) == 48 and float(b.val.targets[:, :, 0].max()) == 47
    assert float(b.val.targets[:, :, 0].min()) == 42 and float(b.val.inputs.min()) < 42


def test_csv_split_never_lets_a_later_value_into_training(tmp_path):
    # a spike in the test part and gaps at every part boundary: nothing of it reaches training
    # rows: train 0..41, val 42..47, test 48..59
    rows = [f"{i},{'' if i in (41, 42, 47, 48) else (1e6 if i >= 48 else i)}" for i in range(60)]
    path = write_csv(tmp_path / "leak.csv", rows, header="t,a")
    b = build_data(data(name="csv", path=str(path), time_column="t", columns="a", window=8,
                        horizon=3, season=4, test_fraction=0.2, val_fraction=0.1))
    train_values = torch.cat([b.train.inputs.flatten(), b.train.targets.flatten()])
    assert float(train_values.max()) == 40                    # the gap at 41 is filled from 40
    assert b.info.mean[0] < 42 and b.info.std[0] < 42         # statistics: train rows only
    assert float(b.val.targets.max()) == 46                   # the gap at 47 from the val part
    assert float(b.test.targets.min()) == 1e6                 # the test windows hold the spike


def test_times_parse_as_numbers_or_dates():
    assert parse_time("1958.5") == 1958.5
    assert parse_time("19580329") - parse_time("19580322") == 7        # YYYYMMDD: days
    assert parse_time("2001-12-29") - parse_time("2001-12-28") == 1
    assert parse_time("2001-12-29T12:00:00") - parse_time("2001-12-29") == 0.5
    assert parse_time("soon") is None


@pytest.mark.parametrize("kw, needle", [
    (dict(columns=["a", "zz"]), "data.columns: zz not in s.csv (columns: t, a, b)"),
    (dict(columns=["a"], time_column="when"), "data.time_column: when not in"),
    (dict(columns=[]), "data.columns: name at least one column"),
    (dict(columns=["a"], window=50), "cannot hold one window"),
    (dict(columns=["a"], season=20, window=8), "data.window: 8 is shorter than data.season 20"),
])
def test_csv_errors(series_csv, kw, needle):
    kw = {"time_column": "t", "window": 8, "horizon": 3, "season": 4, **kw}
    assert needle in one_line_error(name="csv", path=str(series_csv), **kw)


def test_csv_bad_cells_name_the_line(tmp_path):
    path = write_csv(tmp_path / "bad.csv", ["1,2,3", "2,x,4"])
    assert "bad.csv line 3: a = 'x' is not a finite float32 number" in one_line_error(
        name="csv", path=str(path), time_column="t", columns=["a"])
    assert "data.path: " in one_line_error(name="csv", path=str(tmp_path / "nope.csv"), columns="a")


def test_co2_is_embedded_with_its_gaps():
    b = build_data(data(name="co2"))
    assert (b.info.shape, b.info.target_shape, b.info.season) == ((104, 1), (52, 1), 52)
    assert len(b.test) == 406 and sum(b.facts["gaps_interpolated"].values()) == 59
    assert 330 < b.info.mean[0] < 345                         # ppm, 1958 to ~1993


# --- npz -------------------------------------------------------------------------------


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("x_shape, layout, inputs, shape", [
    ((6, 10), "auto", "sequence", (10, 1)),
    ((6, 10, 3), "auto", "sequence", (10, 3)),
    ((6, 10, 3), "image", "image", (1, 10, 3)),
    ((6, 2, 5, 5), "auto", "image", (2, 5, 5)),
])
def test_npz_shapes_decide_the_inputs(tmp_path, x_shape, layout, inputs, shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(np.float32)
    y = rng.integers(0, 3, 6)
    path = write_npz(tmp_path / "d.npz", x=x, y=y, x_test=x[:2], y_test=y[:2])
    b = build_data(data(name="npz", path=path, layout=layout))
    assert (b.info.task, b.info.inputs, b.info.shape, b.info.num_classes) == ("classify", inputs, shape, 3)
    assert b.train.inputs.dtype == torch.float32 and b.train.targets.dtype == torch.int64
    per_channel = torch.from_numpy(x).reshape(6, *shape).movedim(1 if inputs == "image" else -1, -1)
    want = per_channel.reshape(-1, per_channel.shape[-1]).double().mean(0)
    assert b.info.mean == pytest.approx(tuple(want.tolist()), rel=1e-3, abs=1e-4)


def test_npz_uint8_images_and_float_regression(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8)
    path = write_npz(tmp_path / "i.npz", x=imgs, y=np.arange(5), x_test=imgs, y_test=np.arange(5),
                     x_val=imgs[:2], y_val=np.arange(2))
    b = build_data(data(name="npz", path=path, augment=True))
    assert b.info.inputs == "image" and b.train.inputs.dtype == torch.uint8 and len(b.val) == 2
    x, _ = next(iterate_batches(b.train, 5, shuffle=False))
    assert x.dtype == torch.float32 and float(x.max()) <= 1.0
    seq = rng.normal(size=(7, 12, 2)).astype(np.float32)
    target = rng.normal(size=(7, 3, 2)).astype(np.float32)
    path = write_npz(tmp_path / "r.npz", x=seq, y=target, x_test=seq, y_test=target)
    b = build_data(data(name="npz", path=path))
    assert (b.info.task, b.info.target_shape, b.info.target_channels, b.info.season) == \
        ("forecast", (3, 2), (0, 1), 1)
    other = write_npz(tmp_path / "o.npz", x=seq, y=target[:, :, 0].reshape(7, 3, 1)[:, :, 0] * 0 + 1,
                      x_test=seq, y_test=target[:, :, 0])
    assert not build_data(data(name="npz", path=other)).info.baselines   # y does not continue x


@pytest.mark.parametrize("arrays, needle", [
    (dict(x=np.zeros((3, 4), np.float32), y=np.zeros(3, int)), "lacks array(s) x_test, y_test"),
    (dict(x=np.zeros((3, 4), np.float32), y=np.zeros(2, int), x_test=np.zeros((1, 4), np.float32),
          y_test=np.zeros(1, int)), "y: 2 samples, its x has 3"),
    (dict(x=np.zeros((3, 4), np.float32), y=np.zeros(3, int), x_test=np.zeros((1, 5), np.float32),
          y_test=np.zeros(1, int)), "x_test: shape (1, 5, 1) does not match x (3, 4, 1)"),
    (dict(x=np.zeros((3, 4), np.int32), y=np.zeros(3, int), x_test=np.zeros((1, 4), np.int32),
          y_test=np.zeros(1, int)), "x: expected float"),
    (dict(x=np.zeros((3, 4), np.float32), y=np.array(["a", "b", "c"]),
          x_test=np.zeros((1, 4), np.float32), y_test=np.array(["a"])), "y: expected integer classes"),
    (dict(x=np.zeros((3, 4), np.float32), y=np.zeros(3, int), x_test=np.zeros((1, 4), np.float32),
          y_test=np.zeros(1, int), x_val=np.zeros((1, 4), np.float32)), "lacks array(s) y_val"),
])
def test_npz_errors(tmp_path, arrays, needle):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    assert needle in one_line_error(name="npz", path=path)


def test_npz_never_unpickles(tmp_path):
    path = write_npz(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1),
                     x_test=np.zeros(1), y_test=np.zeros(1))
    assert "not a readable .npz of plain arrays" in one_line_error(name="npz", path=path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "not a readable" in one_line_error(name="npz", path=str(tmp_path / "junk.npz"))


# --- image folders ---------------------------------------------------------------------


def write_images(root, layout: dict[str, dict[str, int]], size=(6, 6), mode="L"):
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for cls, n in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_imagefolder_reads_class_folders(tmp_path):
    write_images(tmp_path, {"train": {"cat": 3, "dog": 2}, "test": {"dog": 2}, "val": {"cat": 1}})
    b = build_data(data(name="imagefolder", root=str(tmp_path)))
    assert (b.info.shape, b.info.num_classes) == ((1, 6, 6), 2)
    assert b.train.targets.tolist() == [0, 0, 0, 1, 1] and b.test.targets.tolist() == [1, 1]
    assert len(b.val) == 1 and b.train.augment == "shift"
    saved = np.array(Image.open(tmp_path / "train" / "dog" / "1.png"))
    assert torch.equal(b.train.inputs[4, 0], torch.from_numpy(saved))


def test_imagefolder_mixed_sizes_and_colours(tmp_path):
    write_images(tmp_path, {"train": {"a": 2, "b": 1}}, size=(6, 6))
    write_images(tmp_path, {"test": {"a": 1}}, size=(9, 7), mode="RGB")
    assert "set data.image_size=N" in one_line_error(name="imagefolder", root=str(tmp_path))
    b = build_data(data(name="imagefolder", root=str(tmp_path), image_size=8))
    assert b.info.shape == (3, 8, 8) and b.train.augment == "shift+flip"   # colour wins


@pytest.mark.parametrize("make, needle", [
    (lambda root: None, "test not found"),
    (lambda root: write_images(root, {"train": {"a": 1}, "test": {"b": 1}}), "class folder(s) b do not exist"),
    (lambda root: (write_images(root, {"train": {"a": 1}, "test": {"a": 1}}),
                   (root / "train" / "a" / "x.png").write_bytes(b"junk")), "x.png: not a readable image"),
])
def test_imagefolder_errors(tmp_path, make, needle):
    (tmp_path / "train").mkdir(exist_ok=True)
    make(tmp_path)
    assert needle in one_line_error(name="imagefolder", root=str(tmp_path))


# --- Hugging Face datasets ---------------------------------------------------------------


def test_hf_text_dataset_saved_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict
    lines = [f"line {i} of some text\n" for i in range(40)]
    DatasetDict({"train": Dataset.from_dict({"text": lines[:30]}),
                 "validation": Dataset.from_dict({"text": lines[30:35]}),
                 "test": Dataset.from_dict({"text": lines[35:]})}).save_to_disk(tmp_path / "ds")
    b = build_data(data(name="hf", seq_len=16, hf={"path": str(tmp_path / "ds"),
                                                   "val_split": "validation"}))
    assert b.info.task == "lm" and len(b.val) > 0
    assert Tokenizer.of(b.info).decode(b.train.inputs[0]) == "".join(lines)[:16]
    assert "data.hf.test_split: 'nope' not in" in one_line_error(
        name="hf", hf={"path": str(tmp_path / "ds"), "test_split": "nope"})
    assert "data.hf.text_column: 'body' not in" in one_line_error(
        name="hf", hf={"path": str(tmp_path / "ds"), "text_column": "body"})


def test_hf_image_dataset_saved_to_disk(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image as HFImage
    rng = np.random.default_rng(0)
    feats = Features({"img": HFImage(), "label": ClassLabel(names=["a", "b", "c"])})

    def split(n):
        return Dataset.from_dict({"img": [Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8))
                                          for _ in range(n)], "label": [i % 2 for i in range(n)]},
                                 features=feats)
    DatasetDict({"train": split(4), "test": split(2)}).save_to_disk(tmp_path / "img")
    b = build_data(data(name="hf", hf={"path": str(tmp_path / "img")}))
    assert (b.info.task, b.info.shape, b.info.num_classes) == ("classify", (1, 5, 5), 3)
    assert b.train.targets.tolist() == [0, 1, 0, 1]


def test_hf_unknown_path_is_one_line_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = one_line_error(name="hf", root=str(tmp_path), hf={"path": "no-such-dataset-xyz"})
    assert msg.startswith("data.hf.path: ") and "no-such-dataset-xyz" in msg


# --- sequential MNIST ----------------------------------------------------------------------


def test_sequential_mnist_is_the_embedded_subset_as_rows():
    seq = build_data(data(name="sequential-mnist"))
    img = build_data(data(name="mnist-5k"))
    assert (seq.info.task, seq.info.inputs, seq.info.shape) == ("classify", "sequence", (28, 28))
    assert torch.equal(seq.train.inputs, img.train.inputs[:, 0])
    x, _ = next(iterate_batches(seq.train, 8, shuffle=False, augment=True))
    assert x.shape == (8, 28, 28) and x.dtype == torch.float32


def test_an_input_gap_never_borrows_from_the_targets_after_it(tmp_path):
    # row 20 is empty and row 21 jumps: a window ending at row 20 must read row 19's value
    rows = [f"{i},{'' if i == 20 else (100.0 if i >= 21 else 1.0)}" for i in range(60)]
    path = write_csv(tmp_path / "jump.csv", rows, header="t,a")
    b = build_data(data(name="csv", path=str(path), time_column="t", columns="a", window=8,
                        horizon=3, season=4, test_fraction=0.2))
    ends = list(range(7, 48 - 3))
    i = ends.index(20)
    assert float(b.train.inputs[i, -1, 0]) == 1.0                  # carried forward
    assert float(b.train.targets[ends.index(19), 0, 0]) == pytest.approx(50.5)  # interpolated target


def test_npz_edge_cases(tmp_path):
    x = np.zeros((4, 5), np.float32)
    path = write_npz(tmp_path / "e.npz", x=x, y=np.zeros(4, int), x_test=x[:0], y_test=np.zeros(0, int))
    assert "x_test: no samples" in one_line_error(name="npz", path=path)
    trained = build_data(data(name="npz", path=write_npz(tmp_path / "t.npz", x=x, y=np.arange(4),
                                                         x_test=x, y_test=np.arange(4))))
    fewer = write_npz(tmp_path / "f.npz", x=x, y=np.arange(4), x_test=x[:2], y_test=np.array([0, 1]))
    assert build_data(data(name="npz", path=fewer), like=trained.info).info.num_classes == 4


def test_hf_unlabelled_or_non_text_columns_are_one_line(tmp_path):
    from datasets import Dataset, DatasetDict
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)) for _ in range(3)]
    DatasetDict({"train": Dataset.from_dict({"image": imgs, "label": [0, 1, 0]}),
                 "test": Dataset.from_dict({"image": imgs, "label": [-1, -1, -1]})}
                ).save_to_disk(tmp_path / "u")
    assert "holds -1 at row 0, not a class id" in one_line_error(
        name="hf", hf={"path": str(tmp_path / "u")})
    DatasetDict({"train": Dataset.from_dict({"text": [1, 2, 3]}),
                 "test": Dataset.from_dict({"text": [4]})}).save_to_disk(tmp_path / "t")
    assert "does not hold text" in one_line_error(name="hf", hf={"path": str(tmp_path / "t")})


def test_a_model_rejects_channels_in_another_order(series_csv):
    kw = dict(name="csv", path=str(series_csv), time_column="t", window=8, horizon=3, season=4)
    trained = build_data(data(columns=["a", "b"], **kw))
    with pytest.raises(DataError, match=r"columns \['b', 'a'\] vs \['a', 'b'\]"):
        build_data(data(columns=["b", "a"], **kw), like=trained.info)
