"""`deqctl data RECIPE`: prepares a recipe's data (the token cache among it) and says what a
model will see, with the recipe's model counted on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deqctl import recipe as recipes
from deqctl.cli import app
from deqctl.data import build_data
from deqctl.models import build_model

from cli_helpers import CONFIGS, RECIPE, runner

pytestmark = pytest.mark.usefixtures("one_thread")
SHAKESPEARE = str(CONFIGS / "shakespeare-deq.yaml")


def as_json(*args) -> dict:
    result = runner.invoke(app, ["data", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_text_recipe_is_tokenized_into_the_cache_and_described(tmp_path):
    report = as_json(SHAKESPEARE, f"data.root={tmp_path}", "data.seq_len=64")
    test = report["splits"]["test"]
    assert Path(test["token_files"]).is_file() and Path(test["token_files"]).parent == tmp_path / "tokens"
    assert test["token_file_bytes"] == 2 * test["tokens"]           # uint16 ids
    assert test["samples"] == (test["tokens"] - 1) // 64
    assert report["data"]["vocab_size"] == 77 and report["splits"]["train"]["unknown_tokens"] == 0
    recipe = recipes.load(SHAKESPEARE, [f"data.root={tmp_path}", "data.seq_len=64"])
    model = build_model(recipe, build_data(recipe.data).info)
    assert report["model"] == {"name": "transformer_deq",
                               "parameters": sum(p.numel() for p in model.parameters()),
                               "trainable": sum(p.numel() for p in model.parameters())}
    result = runner.invoke(app, ["data", SHAKESPEARE, f"data.root={tmp_path}", "data.seq_len=64"])
    assert result.exit_code == 0
    assert f"model transformer_deq: {report['model']['parameters']:,} parameters" in result.output
    assert "vocabulary: char, 77 ids" in result.output


def test_a_classifier_recipe_names_its_classes():
    result = runner.invoke(app, ["data", RECIPE])
    assert result.exit_code == 0, result.output
    assert "train      4,000 samples" in result.output and "classes: 10 (0, 1," in result.output


def test_a_wrong_key_is_one_line():
    result = runner.invoke(app, ["data", RECIPE, "data.nope=1"])
    assert result.exit_code == 2 and "data.nope" in result.output


def test_json_stays_one_object_when_user_code_prints(tmp_path):
    (tmp_path / "loud.py").write_text(
        "print('hello from user code')\n"
        "from deqctl.models.transformer import TransformerDEQ\n"
        "class Loud(TransformerDEQ):\n    pass\n")
    result = runner.invoke(app, ["data", SHAKESPEARE, f"model.name={tmp_path / 'loud.py'}:Loud",
                                 f"data.root={tmp_path}", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"]["parameters"] > 0
    assert "hello from user code" in result.stderr and "user code: model.name=" in result.stderr
