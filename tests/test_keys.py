"""The metrics table (issue 16): every key it lists is produced by a real run, in the rows
its `when` says, and a run writes no key the table does not know (task metrics aside)."""

from __future__ import annotations


import pytest

from deqctl.keys import KEYS, TABLE
from deqctl.tasks import task_for
from deqctl.data import DataInfo

from cli_helpers import RECIPE, rows, tiny, train

pytestmark = pytest.mark.usefixtures("one_thread")

# the conditions under which the table's keys appear, all switched on
ON = ["deq.jacobian_reg.weight=0.5", "deq.forward.bf16_until=0.5", "deq.backward.mode=ift",
      "train.eval_every=2"]
TINY = [*tiny(train=64, eval=32), "train.max_steps=3"]


@pytest.fixture(scope="module")
def produced(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    out = tmp_path_factory.mktemp("keys") / "run"
    result = train(RECIPE, *TINY, *ON, "--out", str(out))
    assert result.exit_code == 0, result.output
    every = rows(out)
    return [r for r in every if r["split"] == "train"], [r for r in every if r["split"] != "train"]


@pytest.fixture(scope="module")
def recurrent_rows(tmp_path_factory) -> list[dict]:
    """The training rows of a run in deq.mode=recurrent (its keys need that mode)."""
    out = tmp_path_factory.mktemp("keys") / "recurrent"
    result = train(RECIPE, *TINY, "deq.mode=recurrent", "deq.recurrent.depth=3", "--out", str(out))
    assert result.exit_code == 0, result.output
    return [r for r in rows(out) if r["split"] == "train"]


@pytest.mark.parametrize("key", TABLE, ids=lambda k: k.name)
def test_every_key_of_the_table_is_produced_where_it_says(produced, key, request):
    train_rows, eval_rows = produced
    if key.when == "recurrent":
        train_rows = request.getfixturevalue("recurrent_rows")
    where = {"all": train_rows + eval_rows, "train": train_rows, "eval": eval_rows}.get(
        key.when, train_rows)                 # conditions: switched on for training in ON
    assert where and all(key.name in r for r in where), key


def test_no_row_holds_a_key_the_table_does_not_know(produced):
    train_rows, eval_rows = produced
    task = task_for(DataInfo(name="x", task="classify", inputs="image", shape=(1, 28, 28),
                             num_classes=10))
    known = set(KEYS) | {m.key for m in task.metrics}
    for r in train_rows + eval_rows:
        assert set(r) <= known, set(r) - known
