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
    assert "data.bogus: unknown key (valid here: name, root" in text
    assert "deq.forward.solver:" in text and "'fixed_point', 'anderson' or 'broyden'" in text
    assert "extra: unknown key" in text


def test_overrides_split_on_first_equals_and_coerce_yaml_scalars():
    raw = recipes.apply_overrides({}, ["optim.lr=1e-3", "deq.forward.max_iter=12",
                                       "name=a=b", "data.root=null", "deq.eval.tol=1.0e-4"])
    r = recipes.validate(raw)
    assert r.optim.lr == pytest.approx(1e-3)        # PyYAML reads 1e-3 as a string
    assert r.deq.forward.max_iter == 12 and r.name == "a=b" and r.data.root is None
    assert r.deq.eval_settings().tol == pytest.approx(1e-4)


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", "optim.lr.x=1"])
def test_bad_overrides(bad):
    with pytest.raises(recipes.RecipeError, match="override|optim.lr"):
        recipes.validate(recipes.apply_overrides({}, [bad]))


def test_solver_knobs_are_per_solver_blocks():
    r = recipes.validate({"deq": {"forward": {"solver": "broyden", "broyden": {"history": 4},
                                              "anderson": {"m": 3}}}})
    assert r.deq.forward.knobs() == {"history": 4, "line_search": False, "ls_steps": 3,
                                     "check_every": None, "compact": False}
    with pytest.raises(recipes.RecipeError, match="deq.forward.anderson.mm: unknown key"):
        recipes.validate({"deq": {"forward": {"anderson": {"mm": 3}}}})


def test_eval_inherits_forward_settings():
    r = recipes.validate({"deq": {"forward": {"solver": "broyden", "tol": 1e-2},
                                  "eval": {"max_iter": 7}}})
    s = r.deq.eval_settings()
    assert (s.solver, s.tol, s.max_iter) == ("broyden", 1e-2, 7)


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
