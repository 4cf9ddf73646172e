"""Recipe schema, overrides and the resolved dump."""

import pytest
import yaml

from deqctl import recipe as recipes


def test_defaults_validate_and_dump_round_trips(tmp_path):
    r = recipes.validate({})
    path = tmp_path / "r.yaml"
    path.write_text(recipes.dump(r))
    assert recipes.load(path) == r


def test_every_error_is_reported_at_once_with_its_dotted_key():
    with pytest.raises(recipes.RecipeError) as err:
        recipes.validate({"data": {"batch_size": "many", "bogus": 1},
                          "deq": {"forward": {"solver": "newton"}}, "extra": 3})
    text = str(err.value)
    assert "4 error(s)" in text
    assert "data.batch_size:" in text
    assert ("data.bogus: unknown key (valid for data.name=mnist-5k: name, batch_size, "
            "eval_batch_size, limit_train, limit_eval, augment)") in text
    assert "deq.forward.solver: unknown solver 'newton' (valid: anderson, broyden, fixed_point" in text
    assert "extra: unknown key" in text


def test_overrides_split_on_first_equals_and_coerce_yaml_scalars():
    raw = recipes.apply_overrides({}, ["optim.lr=1e-3", "deq.forward.max_iter=12",
                                       "data.name=cifar10", "data.root=a=b",
                                       "deq.eval.tol=1.0e-4"])
    r = recipes.validate(raw)
    assert r.optim.lr == pytest.approx(1e-3)        # PyYAML reads 1e-3 as a string
    assert r.deq.forward.max_iter == 12 and r.data.root == "a=b"
    assert r.deq.eval_settings().tol == pytest.approx(1e-4)


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", "optim.lr.x=1"])
def test_bad_overrides(bad):
    with pytest.raises(recipes.RecipeError, match="override|optim.lr"):
        recipes.validate(recipes.apply_overrides({}, [bad]))


def test_solver_knobs_are_per_solver_blocks():
    r = recipes.validate({"deq": {"forward": {"solver": "broyden", "broyden": {"history": 4},
                                              "anderson": {"m": 3}}}})
    assert r.deq.forward.options() == {"history": 4, "line_search": False, "ls_steps": 3}
    spec = r.deq.forward.spec()
    assert (spec.solver, spec.options) == ("broyden", {"history": 4, "line_search": False,
                                                       "ls_steps": 3})
    with pytest.raises(recipes.RecipeError, match="deq.forward.anderson.mm: unknown key"):
        recipes.validate({"deq": {"forward": {"anderson": {"mm": 3}}}})


def test_eval_inherits_forward_settings():
    r = recipes.validate({"deq": {"forward": {"solver": "broyden", "tol": 1e-2},
                                  "eval": {"max_iter": 7}}})
    s = r.deq.eval_settings()
    assert (s.solver, s.tol, s.max_iter) == ("broyden", 1e-2, 7)


def test_bf16_until_is_a_forward_setting_above_tol():
    r = recipes.validate({"deq": {"forward": {"tol": 1e-4, "bf16_until": 1e-2}}})
    assert r.deq.forward.spec().bf16_until == 1e-2
    assert r.deq.eval_settings().spec().bf16_until == 1e-2
    # another measure (stop_mode) leaves the eval solve in one precision
    r = recipes.validate({"deq": {"forward": {"tol": 1e-4, "bf16_until": 1e-2},
                                  "eval": {"stop_mode": "abs", "tol": 0.1}}})
    assert r.deq.eval_settings().spec().bf16_until is None
    # one rule, one outcome: a tolerance at or above it is an error naming both keys
    # (an eval tolerance was silently solved in one precision before)
    for deq, tol_key in (({"forward": {"tol": 1e-3, "bf16_until": 1e-3}}, "deq.forward.tol"),
                         ({"forward": {"tol": 1e-4, "bf16_until": 1e-2}, "eval": {"tol": 1e-2}},
                          "deq.eval.tol")):
        with pytest.raises(recipes.RecipeError) as err:
            recipes.validate({"deq": deq})
        assert f"bf16_until: must be above {tol_key}" in str(err.value)
        assert "deq.forward.bf16_until=null" in str(err.value)
    with pytest.raises(ValueError, match=r"bf16_until: must be above tol \(0.05\)"):
        r.deq.forward.spec().but(tol=0.05)
    with pytest.raises(recipes.RecipeError, match="deq.backward.bf16_until: unknown key"):
        recipes.validate({"deq": {"backward": {"bf16_until": 1e-2}}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(recipes.RecipeError, match="not found"):
        recipes.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(recipes.RecipeError, match="not valid YAML"):
        recipes.load(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(recipes.RecipeError, match="expected a mapping"):
        recipes.load(lst)


def test_shipped_configs_are_valid():
    from pathlib import Path
    configs = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert configs
    for path in configs:
        recipes.load(path)
        assert path.read_text().startswith("#"), f"{path} lacks its header comment"
        assert "deqctl " in path.read_text().splitlines()[1] + path.read_text().splitlines()[0]


def test_data_and_model_blocks_are_chosen_by_name_and_checked_as_their_own():
    r = recipes.validate({"data": {"name": "csv", "path": "x.csv", "columns": "co2"},
                          "model": {"name": "tcn_deq", "channels": 16}})
    assert r.data.columns == ["co2"] and r.model.kernel_size == 2   # a single column reads as a list
    with pytest.raises(recipes.RecipeError) as err:
        recipes.validate({"data": {"name": "co2", "path": "x"},
                          "model": {"name": "transformer_deq", "channels": 3},
                          "deq": {"forward": {"max_iter": 0}}})
    lines = [line.strip() for line in str(err.value).splitlines()[1:]]
    assert lines[0].startswith("data.path: unknown key (valid for data.name=co2: name, batch_size")
    assert lines[1].startswith("model.channels: unknown key (valid for "
                               "model.name=transformer_deq: name, d_model")
    assert lines[2].startswith("deq.forward.max_iter:")
    with pytest.raises(recipes.RecipeError, match=r"model.name: unknown model 'mlp' \(valid: "
                                                  r"mdeq, (\w+, )*resnet_deq, tcn_deq, transformer_deq"):
        recipes.validate({"model": {"name": "mlp"}})


def test_a_stored_recipe_moves_to_other_data_of_its_kind_by_overrides_alone():
    # what `deqctl eval RUN data.name=text data.files.test=OTHER.txt` does to a stored recipe
    stored = recipes.validate({"data": {"name": "shakespeare", "seq_len": 64}})
    raw = recipes.apply_overrides(stored.model_dump(mode="json"),
                                  ["data.name=text", "data.files.test=other.txt"])
    r = recipes.validate(raw)
    assert (r.data.name, r.data.seq_len, r.data.files.test) == ("text", 64, "other.txt")
    co2 = recipes.validate({"data": {"name": "co2"}}).model_dump(mode="json")
    r = recipes.validate(recipes.apply_overrides(co2, ["data.name=csv", "data.path=m.csv",
                                                      "data.columns=[a,b]"]))
    assert (r.data.window, r.data.columns) == (104, ["a", "b"])


def test_the_deq_block_is_the_plain_layer_s_settings():
    from deqctl import DEQ
    raw = {"forward": {"solver": "broyden", "max_iter": 12},
           "eval": {"solver": "anderson", "max_iter": 40},
           "backward": {"mode": "phantom", "phantom_steps": 3},
           "jacobian_reg": {"weight": 0.5, "every": 2}}
    r = recipes.validate({"deq": raw})
    assert DEQ(**raw).settings == r.deq            # the same schema, from Python
    layer = DEQ(r.deq)
    assert (layer.fwd_spec.solver, layer.fwd_spec.max_iter) == ("broyden", 12)
    assert layer.fwd_spec.options == {"history": 8, "line_search": False, "ls_steps": 3}
    assert (layer.eval_spec.solver, layer.eval_spec.max_iter, layer.eval_spec.options) == \
        ("anderson", 40, {"m": 5, "lam": 1e-4, "beta": 1.0})
    assert (layer.backward_mode, layer.phantom_steps) == ("phantom", 3)
    assert (layer.jacobian_reg, layer.jacobian_every) == (0.5, 2)


def test_the_readme_example_of_the_plain_layer_runs():
    """The example on the docs page the README links for it, docs/your-own-parts.md."""
    import re
    from pathlib import Path
    page = (Path(__file__).parents[1] / "docs" / "your-own-parts.md").read_text()
    section = page.split("## The DEQ layer in your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/your-own-parts.md", "exec"), scope)
    info = scope["info"]
    assert info.forward.converged.all() and info.backward is not None
    assert info.backward.converged.all()


def test_recipes_stored_by_the_previous_version_still_load():
    """Before data blocks were chosen by name, every data block carried root/download."""
    from pathlib import Path
    old = Path(__file__).parent / "fixtures" / "old-recipe.yaml"
    raw = recipes.load_raw(old)
    assert raw["data"]["root"] is None and "download" in raw["data"]
    with pytest.raises(recipes.RecipeError, match="data.root: unknown key"):
        recipes.validate(raw)                      # a user's recipe stays strict
    r = recipes.validate(recipes.migrate(raw))
    assert r.data.name == "mnist-5k" and r.model.init_std == 0.01


def test_switching_source_by_override_drops_the_old_blocks_keys():
    stored = recipes.validate({"data": {"name": "hf", "hf": {"path": "wikitext"}, "seq_len": 64,
                                        "augment": False}}).model_dump(mode="json")
    r = recipes.validate(recipes.apply_overrides(stored, ["data.name=text",
                                                          "data.files.test=t.txt"]))
    assert (r.data.name, r.data.seq_len, r.data.files.test) == ("text", 64, "t.txt")
    # keys given in the same overrides are the user's: still checked
    with pytest.raises(recipes.RecipeError, match="data.window: unknown key"):
        recipes.validate(recipes.apply_overrides(stored, ["data.name=text", "data.window=3"]))
    # without a name override nothing is dropped
    with pytest.raises(recipes.RecipeError, match="data.hf: unknown key"):
        recipes.validate(recipes.apply_overrides({**stored, "data": {**stored["data"], "name": "text"}}, []))
