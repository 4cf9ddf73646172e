"""Prefix sums (data.name: prefix-sums) and the per-position task `tag`: the generated
strings and their running-parity labels, the task's loss and metrics, and tiny models
trained on short strings and evaluated on longer ones from the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from deqctl import recipe as recipes
from deqctl.cli import app
from deqctl.data import DataInfo, build_data
from deqctl.models import build_model
from deqctl.tasks import task_for

from cli_helpers import CONFIGS, rows, runner

RECIPE = str(CONFIGS / "prefix-sums-deq.yaml")
pytestmark = pytest.mark.usefixtures("one_thread")


def data(**keys):
    return build_data(recipes.validate({"data": {"name": "prefix-sums", **keys}}).data)


def parity(bits: list[int]) -> list[int]:
    out, p = [], 0
    for b in bits:
        p ^= b
        out.append(p)
    return out


def test_strings_are_a_pure_function_of_the_seed_labelled_with_their_running_parity():
    a = data(train_size=50, test_size=20, val_size=10, length=12, test_length=30)
    b = data(train_size=50, test_size=20, val_size=10, length=12, test_length=30)
    for part in ("train", "val", "test"):
        assert torch.equal(a.split(part).inputs, b.split(part).inputs)
        assert torch.equal(a.split(part).targets, b.split(part).targets)
        x, y = a.split(part).inputs, a.split(part).targets
        assert set(x.unique().tolist()) == {1, 2}           # the char ids of "0" and "1"
        for row, labels in zip(x.tolist(), y.tolist()):
            assert labels == parity([i - 1 for i in row])
    assert not torch.equal(a.train.inputs, data(train_size=50, length=12, seed=1).train.inputs)
    # one split's size leaves the others' strings alone (a stream per split)
    assert torch.equal(a.test.inputs, data(train_size=7, test_size=20, test_length=30).test.inputs)
    # uniform bits: about half are ones
    assert abs((data(train_size=2000).train.inputs == 2).float().mean().item() - 0.5) < 0.02


def test_train_and_val_take_the_length_test_the_test_length():
    bundle = data(train_size=40, val_size=8, test_size=16, length=8, test_length=16)
    assert tuple(bundle.train.inputs.shape) == tuple(bundle.train.targets.shape) == (40, 8)
    assert tuple(bundle.val.inputs.shape) == (8, 8)
    assert tuple(bundle.test.inputs.shape) == tuple(bundle.test.targets.shape) == (16, 16)
    info = bundle.info
    assert (info.task, info.inputs, info.shape, info.num_classes) == ("tag", "tokens", (8,), 2)
    assert info.vocab_size == 3 and bundle.facts["string_length"] == {
        "train": 8, "val": 8, "test": 16}
    assert DataInfo.from_dict(json.loads(json.dumps(info.as_dict()))) == info
    assert data(val_size=0, train_size=4).val is None
    defaults = data()
    assert (len(defaults.train), len(defaults.val), len(defaults.test)) == (10_000, 1000, 1000)
    assert defaults.train.inputs.shape[1] == 32 and defaults.test.inputs.shape[1] == 64


def test_tag_loss_and_metrics_on_hand_made_logits():
    task = task_for(data(train_size=4, test_size=4).info)
    assert task.name == "tag" and task.headline.key == "solved" and task.better(0.9, 0.5)
    assert [m.key for m in task.metrics] == ["solved", "accuracy"]
    # two strings of three positions; the second gets its middle position wrong
    y = torch.tensor([[0, 1, 1], [1, 0, 0]])
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]],
                           [[0.0, 1.0], [0.0, 2.0], [1.0, 0.0]]])
    expected = -sum(math.log(torch.softmax(logits[i, t], 0)[y[i, t]].item())
                    for i in range(2) for t in range(3)) / 6
    assert task.loss(logits, y).item() == pytest.approx(expected, rel=1e-6)
    stats = task.stats(logits, None, y)
    assert stats["accuracy"].item() == pytest.approx(5 / 6)
    assert stats["solved"].item() == pytest.approx(1 / 2)
    other = logits.clone()
    other[1, 0] = torch.tensor([3.0, 0.0])            # string 1 changes its first answer
    assert task.agree(logits, other).tolist() == [True, False]
    assert task.agree(logits, logits * 2).tolist() == [True, True]


TINY = ["data.train_size=96", "data.val_size=16", "data.test_size=32", "data.batch_size=32",
        "data.eval_batch_size=32", "model.channels=8", "deq.forward.max_iter=12",
        "deq.backward.max_iter=12", "deq.eval.max_iter=24", "train.max_steps=3",
        "train.log_every=1", "train.eval_every=0", "runtime.threads=1"]


def train_tiny(out: Path, *overrides: str, ignore: tuple[str, ...] = ()) -> Path:
    """Train the recipe 3 steps on a tiny model (TINY overrides starting with `ignore` left
    out), then test it."""
    tiny = [o for o in TINY if not o.startswith(ignore)] if ignore else TINY
    result = runner.invoke(app, ["train", RECIPE, *tiny, *overrides, "--out", str(out),
                                 "--plain"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """Trained 3 steps on strings of 8 bits, tested on 16."""
    return train_tiny(tmp_path_factory.mktemp("ps") / "run", "data.length=8",
                      "data.test_length=16")


def test_a_tiny_model_trains_and_eval_prints_the_metrics(short_run):
    written = rows(short_run)
    train = [r for r in written if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in (*train, written[-1]):
        assert 0 <= r["solved"] <= r["accuracy"] <= 1 and math.isfinite(r["loss"])
    assert written[-1]["split"] == "test"
    result = runner.invoke(app, ["eval", str(short_run), "runtime.threads=1"])
    assert result.exit_code == 0, result.output
    assert "solved" in result.output and "acc" in result.output
    assert "test split, 32 samples" in result.output


def test_trained_on_8_bits_it_evaluates_on_16_and_longer(short_run):
    result = runner.invoke(app, ["eval", str(short_run), "--json", "runtime.threads=1"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["data"]["string_length"]["test"] == 16 and 0 <= out["solved"] <= 1
    # the test length moves by override alone; the model reads what it is given
    result = runner.invoke(app, ["eval", str(short_run), "data.test_length=40", "--json",
                                 "--sweep-iters", "2,40", "runtime.threads=1"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["data"]["string_length"]["test"] == 40
    assert [p["max_iter"] for p in out["sweep"]] == [2, 40]
    assert out["sweep"][0]["fwd_nfe"] <= 2 < out["sweep"][1]["fwd_nfe"]
    import deqctl

    model = deqctl.load(short_run / "checkpoints" / "final")
    with torch.no_grad():
        logits = model(data(length=8, test_length=40, train_size=1, test_size=3).test.inputs)
    assert tuple(logits.shape) == (3, 40, 2)


@pytest.mark.parametrize("causal", [True, False])
def test_a_causal_tagger_never_sees_later_bits(causal):
    """Plain iteration of the cell from zeros, then the head: with model.causal=true no
    position's output moves when a later bit flips (a solver that mixes positions, such as
    Anderson's per-sample least squares, may still move them a little)."""
    recipe = recipes.validate({"data": {"name": "prefix-sums"},
                               "model": {"name": "transformer_deq", "d_model": 16, "heads": 2,
                                         "d_ff": 16, "causal": causal}})
    torch.manual_seed(0)
    model = build_model(recipe, data(train_size=1, test_size=1, length=10).info).eval()
    x = torch.tensor([[1, 2, 2, 1, 2, 1, 1, 2, 2, 1]])
    flipped = x.clone()
    flipped[0, -1] = 2

    def iterate(x: torch.Tensor) -> torch.Tensor:
        u = model.inject(x)
        z = model.init_state(u)
        for _ in range(8):
            z = model.cell(z, u)
        return model.decode(z, x)

    with torch.no_grad():
        a, b = iterate(x), iterate(flipped)
    assert tuple(a.shape) == (1, 10, 2) and not torch.equal(a[:, -1], b[:, -1])
    assert torch.equal(a[:, :-1], b[:, :-1]) is causal


def test_a_causal_transformer_tagger_trains(tmp_path):
    run = train_tiny(tmp_path / "run", "model={name: transformer_deq, d_model: 16, heads: 2, "
                     "d_ff: 16, causal: true}", "data.length=8", "data.test_length=12",
                     ignore=("model.",))
    assert rows(run)[-1]["split"] == "test" and 0 <= rows(run)[-1]["solved"] <= 1


@pytest.mark.parametrize("override, says", [
    ("data.length=0", "data.length"),
    ("data.test_length=-3", "data.test_length"),
    ("data.test_length=100000", "data.test_length"),
    ("data.test_size=2000000", "data.test_length: 2,000,000 strings of 64 bits"),
    ("model.head.pool=flatten", "model.head.pool=flatten: a tagger predicts at every position"),
])
def test_bad_sizes_are_one_line_exit_2(override, says, tmp_path):
    result = runner.invoke(app, ["train", RECIPE, *TINY, override, "--out",
                                 str(tmp_path / "run"), "--plain"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any(says in line for line in lines), result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
