"""The one Registry of every method family, and the one format of config errors
(``<where> (<method>): <key>: <problem>``) that recipes, adapters and training settings share."""
import pytest
from pydantic import BaseModel, ConfigDict, Field

from slimtune.registry import ConfigError, Registry, validate


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    size: int = Field(4, ge=1)


def build(config):
    return config.size


def test_register_get_names_and_hooks():
    reg = Registry("toy method", required=("build",), optional=("after",))
    entry = reg.register("b", ToyConfig, build=build)
    reg.register("a", ToyConfig, build=build, after=print)
    assert reg.names() == ["a", "b"] and "a" in reg and "c" not in reg
    assert reg.get("b") is entry and entry.hook("build") is build and entry.hook("after") is None
    assert reg.register("b", ToyConfig, build=build) == entry  # the same again: a no-op
    reg.unregister("a")
    assert reg.names() == ["b"]


@pytest.mark.parametrize("hooks, message", [
    ({}, r"missing hooks \['build'\]"),
    ({"build": build, "prepare": build}, r"unknown hooks \['prepare'\]"),
])
def test_registration_refuses_missing_and_unknown_hooks(hooks, message):
    with pytest.raises(ValueError, match=message):
        Registry("toy method", required=("build",)).register("x", ToyConfig, **hooks)


def test_a_name_cannot_be_registered_twice_with_other_contents():
    reg = Registry("toy method", required=("build",))
    reg.register("x", ToyConfig, build=build)
    with pytest.raises(ValueError, match="toy method 'x' is already registered"):
        reg.register("x", ToyConfig, build=lambda c: None)


def test_unknown_name_lists_the_known_ones():
    reg = Registry("toy method", required=("build",))
    reg.register("x", ToyConfig, build=build)
    with pytest.raises(ValueError, match=r"unknown toy method 'y'; known: x"):
        reg.get("y")


def test_config_errors_have_one_line_each_in_one_format():
    reg = Registry("toy method", required=("build",))
    reg.register("x", ToyConfig, build=build)
    with pytest.raises(ConfigError) as err:
        reg.make_config("x", "step 3", size=0, colour="red")
    assert str(err.value).splitlines() == [
        "step 3 (x): size: input should be greater than or equal to 1, got 0",
        "step 3 (x): colour: unknown parameter; known: size",
    ]
    with pytest.raises(ConfigError, match=r"^training: --size: must be a number, got 'big'$"):
        validate(ToyConfig, {"method": "x", "size": "big"}, "training",
                 key=lambda k: f"--{k}")


def test_every_family_words_errors_the_same_way():
    from slimtune.adapt import make_config
    from slimtune.compress import RecipeError, load_recipe
    from slimtune.train import make_train_config

    with pytest.raises(RecipeError, match=r"^step 0 \(svd\): ratio: must be in \(0, 1\), got 2"):
        load_recipe([{"method": "svd", "ratio": 2}])
    with pytest.raises(ValueError, match=r"^adapter \(pissa\): svd: must be 'exact', 'gram' or "
                                         r"'randomized', got 'fast'$"):
        make_config("pissa", svd="fast")
    with pytest.raises(ValueError, match=r"^training \(lora\): steps: input should be greater "
                                         r"than or equal to 1, got 0$"):
        make_train_config("lora", data="ptb", steps=0)
