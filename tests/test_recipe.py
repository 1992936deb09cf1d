"""Recipes: every mistake is one clear RecipeError naming step, method and key, before any model
is loaded; the example recipes in recipes/ load and build."""
from pathlib import Path

import pytest
from pydantic import BaseModel
from torch import nn

from slimtune.compress.lowrank.steps import AllocatedLowRankStep, LowRankStep
from slimtune.compress.recipe import (
    RecipeError, build_steps, check_targets, known_methods, load_recipe, method_config)
from slimtune.compress.registry import METHODS

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("text, message", [
    ("- {method: svd_llm, ratio: 0.8}\n- {method: svd, ratio: 0.5}\n"
     "- {method: svd_llm, ratio: 1.5}", "step 2 (svd_llm): ratio: must be in (0, 1), got 1.5"),
    ("- {method: svd, ratio: 0}", "step 0 (svd): ratio: must be in (0, 1), got 0"),
    ("- {method: svd, ratio: -0.2}", "step 0 (svd): ratio: must be in (0, 1), got -0.2"),
    ("- {method: svd, ratio: 1}", "step 0 (svd): ratio: must be in (0, 1), got 1"),
    ("- {method: svd, ratio: high}", "step 0 (svd): ratio: must be a number, got 'high'"),
    ("- {method: svd, ratio: true}", "step 0 (svd): ratio: must be a number, got True"),
    ("- {method: svd, ratio: [0.5]}", "step 0 (svd): ratio: must be a number, got [0.5]"),
    ("- {method: svd}", "step 0 (svd): ratio: required parameter is missing"),
    ("- {method: asvd, ratio: 0.5, alpha: big}",
     "step 0 (asvd): alpha: must be a number, got 'big'"),
    ("- {method: asvd, ratio: 0.5, alpha: -1}", "step 0 (asvd): alpha: must be in [0, 4], got -1"),
    ("- {method: svd_llm, ratio: 0.5, damp: -0.1}",
     "step 0 (svd_llm): damp: must be in [0, 1), got -0.1"),
    ("- {method: svd, ratio: 0.5, rank: 8}", "step 0 (svd): rank: unknown parameter; known: "
     "targets, ratio, allocation, candidates, svd"),
    ("- {method: svd, ratio: 0.5, alpha: 0.5}", "step 0 (svd): alpha: unknown parameter"),
    ("- {method: svd, ratio: 0.5, allocation: greedy}", "step 0 (svd): allocation: must be "
     "'uniform', 'welore' or 'sensitivity', got 'greedy'"),
    ("- {method: svd, ratio: 0.5, svd: lanczos}",
     "step 0 (svd): svd: must be 'exact' or 'randomized', got 'lanczos'"),
    ("- {method: svd, ratio: 0.5, candidates: [0.5, 1.0]}",
     "step 0 (svd): candidates: only used with allocation: sensitivity"),
    ("- {method: svd, ratio: 0.5, allocation: sensitivity, candidates: [0.5, 1.5]}",
     "step 0 (svd): candidates: every candidate must be in (0, 1], got 1.5"),
    ("- {method: svd, ratio: 0.5, targets: []}", "step 0 (svd): targets: must be 'all-linear', a "
     "regex or a list of names; got an empty list"),
    ("- {method: svd, ratio: 0.5, targets: ''}", "step 0 (svd): targets: must be 'all-linear', a "
     "regex or a list of names; got an empty string"),
    ("- {method: svd, ratio: 0.5, targets: 'q_proj(['}",
     "step 0 (svd): targets: 'q_proj([' is neither 'all-linear' nor a valid regex"),
    ("- {method: svd, ratio: 0.5, targets: [q_proj, 3]}",
     "step 0 (svd): targets: every name in the list must be a non-empty string; got 3"),
    ("- {method: svd, ratio: 0.5, targets: 7}",
     "step 0 (svd): targets: must be 'all-linear', a regex or a list of names; got 7"),
    ("- {method: tucker, ratio: 0.5}",
     "step 0: method: unknown method 'tucker'; known methods: " + ", ".join(known_methods())),
    ("- {ratio: 0.5}", "step 0: method: missing; known methods: " + ", ".join(known_methods())),
    ("- svd", "step 0: must be a mapping with a 'method' key, got 'svd'"),
    ("[]", "the recipe has no steps"),
    ("method: svd", "a recipe mapping has only the key 'steps'; unknown: ['method']"),
    ("steps: 3", "a recipe is a list of steps"),
    ("- {method: svd, ratio: [", "recipe is not valid YAML"),
])
def test_recipe_error_names_step_method_and_key(text, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(text)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_every_problem_is_reported_at_once():
    with pytest.raises(RecipeError) as err:
        load_recipe([{"method": "svd", "ratio": 2}, {"method": "asvd", "ratio": 0.5, "beta": 1}])
    lines = str(err.value).splitlines()
    assert lines[0].startswith("step 0 (svd): ratio:")
    assert lines[1].startswith("step 1 (asvd): beta: unknown parameter")


def test_missing_recipe_file_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_load_and_build(path):
    configs = load_recipe(path)
    assert configs and all(c.targets == "all-linear" for c in configs)
    assert all(c.ratio == 0.8 for c in configs if hasattr(c, "ratio"))
    for step in build_steps(configs):
        assert step.targets == "all-linear" and callable(step.apply)
        assert isinstance(step.needs, frozenset)


def test_example_recipes_cover_every_method_and_allocation():
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {"svd", "fwsvd", "asvd", "svd_llm", "svd_llm_welore", "svd_llm_sensitivity"} <= names
    assert set(known_methods()) <= names  # every registered method has an example
    welore = build_steps(load_recipe(RECIPES / "svd_llm_welore.yaml"))[0]
    sens = build_steps(load_recipe(RECIPES / "svd_llm_sensitivity.yaml"))[0]
    assert isinstance(welore, AllocatedLowRankStep) and welore.allocation == "welore"
    assert isinstance(sens, AllocatedLowRankStep) and sens.needs == {"gram"}


def test_recipe_forms_path_text_list_and_steps_mapping(tmp_path):
    text = "steps:\n  - method: asvd\n    targets: [q_proj, v_proj]\n    ratio: 0.6\n    alpha: 1\n"
    path = tmp_path / "r.yaml"
    path.write_text(text)
    for source in (path, str(path), text, [{"method": "asvd", "targets": ["q_proj", "v_proj"],
                                            "ratio": 0.6, "alpha": 1}]):
        (config,) = load_recipe(source)
        assert config.method == "asvd" and config.alpha == 1.0 and config.ratio == 0.6
        assert config.targets == ["q_proj", "v_proj"] and config.allocation == "uniform"


def test_needs_and_step_kinds_follow_method_and_allocation():
    expected = {"svd": set(), "fwsvd": {"fisher"}, "asvd": {"mean_abs"}, "svd_llm": {"gram"}}
    assert set(expected) <= set(known_methods())
    for method, needs in expected.items():
        (step,) = build_steps(load_recipe([{"method": method, "ratio": 0.5}]))
        assert isinstance(step, LowRankStep) and step.needs == needs
        (step,) = build_steps(load_recipe([{"method": method, "ratio": 0.5,
                                            "allocation": "sensitivity"}]))
        assert step.needs == needs | {"gram"}
        assert callable(step.measure) and callable(step.allocate)
        assert "ratio" in method_config(method).model_fields


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))


def test_check_targets_names_the_step_that_matches_nothing():
    configs = load_recipe("- {method: svd, ratio: 0.5, targets: [q_proj]}\n"
                          "- {method: svd, ratio: 0.5, targets: [k_proj]}\n"
                          "- {method: asvd, ratio: 0.5, targets: 'mlp\\.\\d'}\n")
    with pytest.raises(RecipeError) as err:
        check_targets(Tiny(), configs)
    assert str(err.value) == "step 1 (svd): targets: ['k_proj'] match no linear layer in Tiny"
    check_targets(Tiny(), [configs[0], configs[2]])


def test_register_adds_a_method():
    class NopConfig(BaseModel):
        method: str
        targets: str = "all-linear"

    def build(config):
        return ("built", config.targets)

    METHODS.register("nop_for_test", NopConfig, build=build)
    try:
        assert "nop_for_test" in known_methods()
        assert build_steps(load_recipe("- {method: nop_for_test, targets: x}")) == [("built", "x")]
        with pytest.raises(ValueError, match="already registered"):
            METHODS.register("nop_for_test", NopConfig, build=lambda c: None)
        with pytest.raises(ValueError, match="missing hooks"):
            METHODS.register("nop_without_build", NopConfig)
    finally:
        METHODS.unregister("nop_for_test")
