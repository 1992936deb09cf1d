"""Generated bad input: recipes and command lines drawn by hypothesis give a clear error (one
``error:`` line, exit 2) or pass validation, never a traceback or an internal error.

In-process and fast: the model loader is replaced by one that raises :class:`ReachedLoading`,
so a command line that passes validation stops there.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.compress import METHODS, RecipeError, load_recipe

runner = CliRunner()
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
SCRATCH = Path(tempfile.mkdtemp(prefix="slimtune-generated-"))


class ReachedLoading(BaseException):
    """Validation passed and the command went on to load a model."""


scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 2000),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["all-linear", "q_proj", "(", "uniform", "welore",
                                     "sensitivity", "exact", "randomized", "input", "0.5"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=6)
keys = st.sampled_from(["ratio", "targets", "allocation", "candidates", "svd", "alpha", "damp",
                        "weighting", "rank", ""]) | st.text(max_size=8)
steps = st.dictionaries(keys, values, max_size=5).flatmap(
    lambda d: st.sampled_from([*METHODS.names(), "nope", None, 3]).map(
        lambda m: d if m is None else {**d, "method": m}))
recipes = st.one_of(st.lists(steps | values, max_size=3), st.dictionaries(
    st.sampled_from(["steps", "extra"]), st.lists(steps, max_size=2), max_size=2), values)


@SETTINGS
@given(recipe=recipes)
def test_any_recipe_loads_or_is_one_recipe_error(recipe):
    try:
        configs = load_recipe(recipe)
    except RecipeError as err:
        assert str(err).strip(), "an empty error message"
        return
    assert configs and all(c.method in METHODS for c in configs)


@SETTINGS
@given(text=st.text(max_size=200))
def test_any_yaml_text_loads_or_is_one_recipe_error(text):
    try:
        load_recipe(text + "\n")
    except RecipeError:
        pass


def flag(name, strategy):
    return st.one_of(st.just([]), strategy.map(lambda v: [name, str(v)]))


def required(name, choices):
    """A flag that is usually given, usually with a valid value (the first choices)."""
    return st.one_of(st.sampled_from(choices).map(lambda v: [name, v]), st.just([]))


numbers = st.one_of(st.integers(1, 64), st.integers(-2, 5000), st.floats(-1, 10, allow_nan=False),
                    st.just("x"))
common = [flag("--seed", st.integers(-5, 5))]
commands = {
    "compress": st.tuples(
        st.just(["compress"]), required("-m", ["minilm-l6", "minilm-l6", "nope", "/no/dir"]),
        required("--recipe", ["recipes/svd.yaml", "recipes/asvd.yaml", "x.yaml"]),
        flag("--n", numbers), flag("--seqlen", numbers), flag("--batch-size", numbers),
        flag("--calib", st.sampled_from(["ptb", "austen", "wiki", "missing.txt"])),
        st.sampled_from([[], ["--merge"], ["--overwrite"]]), *common),
    "adapt": st.tuples(
        st.just(["adapt"]), required("-m", ["minilm-l6", "smollm2-135m", "nope"]),
        required("--method", ["lora", "pissa", "corda", "full", "nope"]),
        flag("--r", numbers), flag("--alpha", numbers), flag("--steps", numbers),
        flag("--lr", numbers), flag("--warmup", numbers), flag("--seqlen", numbers),
        st.sampled_from([["--data", "austen"], ["--task", "finefoods"], [], ["--data",
                         "finefoods"], ["--data", "ptb", "--task", "finefoods"]]),
        st.sampled_from([[], ["-p", "svd=exact"], ["-p", "nonsense"], ["-p", "gamma=x"],
                         ["--calib-data", "ptb"]]),
        st.sampled_from([[], ["--resume"], ["--overwrite"], ["--resume", "--overwrite"]]),
        *common),
    "eval": st.tuples(
        st.just(["eval"]), required("-m", ["smollm2-135m", "minilm-l6", "nope"]),
        required("--data", ["ptb", "austen", "wiki", "missing.txt"]),
        flag("--split", st.sampled_from(["train", "test", "dev"])),
        flag("--seqlen", numbers), flag("--max-tokens", numbers), flag("--batch-size", numbers)),
}


@pytest.fixture
def no_loading(monkeypatch):
    import slimtune.models

    def refuse(*args, **kwargs):
        raise ReachedLoading()

    monkeypatch.setattr(slimtune.models, "load_model", refuse)


@pytest.mark.parametrize("command", sorted(commands))
def test_any_command_line_is_a_clear_error_or_valid(command, no_loading):
    @SETTINGS
    @given(parts=commands[command], out=st.sampled_from(["new", "existing", "file"]))
    def check(parts, out):
        args = [a for part in parts for a in part]
        target = SCRATCH / out
        if out == "existing":
            target.mkdir(exist_ok=True)
            (target / "mine.txt").write_text("keep me")
        elif out == "file":
            target.write_text("a file")
        if command != "eval":
            args += ["--out", str(target / "run") if out == "new" else str(target)]
        try:
            result = runner.invoke(app, args, catch_exceptions=False)
        except ReachedLoading:
            return
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output and "internal error" not in result.output
        if out == "existing":
            assert sorted(p.name for p in target.iterdir()) == ["mine.txt"], args
    check()
