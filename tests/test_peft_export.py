"""Export of our adapters to Hugging Face PEFT on SmolLM2-135M (targets q_proj, v_proj):
``slimtune.adapt.to_peft`` of a perturbed ("trained") adapter, loaded by
``peft.PeftModel.from_pretrained`` on a fresh base, gives our logits within 1e-4 (also through
``slimtune export-peft``); structures PEFT cannot express are refused before anything is written.
Helpers and fixtures (3-block SmolLM2 ``base``, ``full``, ``ids``, ``calib``) come from
test_peft_parity.py; the fast tests use the 3-block model, the slow ones the whole model.
"""
import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")

from slimtune import adapt  # noqa: E402
from slimtune.io.atomic import MARKER, NotOurDirectoryError  # noqa: E402
from slimtune.layers import SparseDelta  # noqa: E402
from slimtune.targets import factored_layers  # noqa: E402
from test_peft_parity import (ALPHA, TOL, R, base, calib, full, ids, logits,  # noqa: E402,F401
                              need, ours, perturb, rel)

# -- export round trips -----------------------------------------------------------------------
FAST = ["rslora", "dora", "pissa", "svfit", "vera"]  # plain, DoRA, origin, core, lora_factors
EXPECTED = ["lora", "rslora", "dora", "pissa", "milora", "olora", "corda", "eva", "svfit", "sorsa",
            "vera", "nola", "miss", "lora_xs", "adalora", "dylora", "sora", "increlora",
            "loldu", "lora_sb", "allora", "ggpo", "ba_lora"]
WITH_ORIGIN = {"pissa", "milora", "olora", "corda", "svfit", "sorsa", "loldu", "lora_sb",
               "ba_lora"}
# training parameterisations and sparse adapters PEFT's LoRA cannot hold: the reason to_peft
# gives (defaults: the layer has no base, or a sparse part; with keep_base, a sparse part)
REFUSED = {"sltrain": ("no base weight", "sparse part"), "lost": ("no base weight", "mask"),
           "sst": ("no base weight", None), "sft": ("sparse part", None),
           "sara": ("sparse part", None), "dsee": ("sparse part", None)}
OTHERS = sorted(set(adapt.known_methods()) - set(EXPECTED) - set(REFUSED))  # registered since


# settings where the generic perturbation would barely move the output (VeRA's d starts at 0.1)
PARAMS = {"rslora": {"rslora": True}, "vera": {"d_initial": 1.0},
          "adalora": {"alpha": 256.0},  # PEFT's init: P, Q ~ N(0, 0.02²), Λ = 0
          "increlora": {"alpha": 256.0}}  # the same init


def adapted(base, method, calib):
    name = "lora" if method == "rslora" else method
    need(name)
    params = PARAMS.get(method, {})
    needs_calib = adapt.needs_calibration(name)
    return ours(base, name, calib=calib if needs_calib else None, **params)


def round_trip(base, model, ids, tmp_path):
    """Perturb ``model``'s adapter, export it, load it into PEFT on a fresh ``base``: the relative
    logits error and the written adapter_config.json."""
    start = logits(model, ids)
    perturb(model)
    expected = logits(model, ids)
    assert rel(expected, start) > 1e-3
    out = adapt.to_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    return rel(logits(loaded, ids), expected), json.loads((out / "adapter_config.json").read_text())


def check_round_trip(base, method, calib, ids, tmp_path):
    model = adapted(base, method, calib)
    err, config = round_trip(base, model, ids, tmp_path)
    assert err < TOL, f"{method}: relative logits error {err:.2e}"
    layers = factored_layers(model)
    assert config["use_dora"] == (method == "dora")
    assert config["use_rslora"] == (method == "rslora")
    assert config["base_model_name_or_path"] == base.config._name_or_path
    assert all((layer.origin is not None) == (method in WITH_ORIGIN) for layer in layers.values())
    ranks = {n: config["rank_pattern"].get(n, config["r"]) for n in layers}
    assert ranks == {n: layer.lowrank.rank + (layer.origin.rank if layer.origin is not None else 0)
                     for n, layer in layers.items()}


@pytest.mark.parametrize("method", FAST)
def test_export_round_trip(base, calib, ids, tmp_path, method):
    check_round_trip(base, method, calib, ids, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", EXPECTED)
def test_export_round_trip_whole_model(full, calib, ids, tmp_path, method):
    check_round_trip(full, method, calib, ids, tmp_path)


def test_every_registered_method_has_an_export_round_trip():
    """A newly registered method must join EXPECTED (and so the round-trip test above), or
    REFUSED with the reason PEFT cannot express it."""
    assert not OTHERS, f"add {OTHERS} to EXPECTED (or REFUSED) in this file"


@pytest.mark.parametrize("method", sorted(REFUSED))
def test_training_parameterisations_are_refused(base, tmp_path, method):
    need(method)
    for params, reason in zip(({}, {"keep_base": True}), REFUSED[method]):
        if reason is None:
            continue
        out = tmp_path / "peft"
        with pytest.raises(ValueError, match=f"cannot export layer .*{reason}"):
            adapt.to_peft(ours(base, method, **params), out)
        assert not out.exists()


def test_trained_norm_exports_as_modules_to_save(base, ids, tmp_path):
    model = ours(base, "lora")
    model.model.norm.weight.requires_grad_(True)
    err, config = round_trip(base, model, ids, tmp_path)
    assert config["modules_to_save"] == ["model.norm"]
    assert err < TOL


# -- refusals and the file contract -----------------------------------------------------------
def test_unexportable_structures_are_refused_before_writing(base, tmp_path):
    model = ours(base, "lora")
    name, layer = next(iter(factored_layers(model).items()))
    out = tmp_path / "peft"
    layer.sparse = SparseDelta((layer.out_features, layer.in_features), torch.tensor([0, 5]),
                               torch.ones(2))
    with pytest.raises(ValueError, match=rf"{name}.*sparse"):
        adapt.to_peft(model, out)
    layer.sparse = None
    layer.mask = torch.ones(layer.out_features, layer.in_features)
    with pytest.raises(ValueError, match=rf"{name}.*mask"):
        adapt.to_peft(model, out)
    layer.mask = None
    layer.merge()
    with pytest.raises(ValueError, match=rf"{name}.*merged"):
        adapt.to_peft(model, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_out_needs_overwrite(base, tmp_path):
    model = ours(base, "lora")
    out = tmp_path / "peft"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        adapt.to_peft(model, out)
    with pytest.raises(NotOurDirectoryError):  # not written by slimtune: never replaced
        adapt.to_peft(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    earlier = adapt.to_peft(model, tmp_path / "earlier")
    adapt.to_peft(model, earlier, overwrite=True)  # an earlier export may be replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "peft"]
    assert sorted(p.name for p in earlier.iterdir()) == [MARKER, "adapter_config.json",
                                                         "adapter_model.safetensors"]


# -- command line -----------------------------------------------------------------------------
def test_cli_export_peft_round_trip(full, ids, tmp_path):
    """``export-peft`` loads the base recorded in adapter.json (the whole model), rebuilds the
    PiSSA base from the saved origin, and writes an adapter PEFT reproduces."""
    from typer.testing import CliRunner

    from slimtune.cli import app

    model = adapt.apply(copy.deepcopy(full), "pissa", r=R, alpha=ALPHA, progress=False,
                        targets=r"model\.layers\.0\.self_attn\.(q|v)_proj")
    perturb(model)
    expected = logits(model, ids)
    adapt.save(model, tmp_path / "ours")
    del model
    runner = CliRunner()
    result = runner.invoke(app, ["export-peft", "--adapter", str(tmp_path / "ours"),
                                 "--out", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    assert "exported pissa adapter (2 layers)" in result.stdout
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(full), tmp_path / "peft").eval()
    assert rel(logits(loaded, ids), expected) < TOL
    again = runner.invoke(app, ["export-peft", "-a", str(tmp_path / "ours"), "-o",
                                str(tmp_path / "peft")])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_cli_export_peft_bad_input_exits_2(tmp_path):
    from typer.testing import CliRunner

    from slimtune.cli import app

    result = CliRunner().invoke(app, ["export-peft", "-a", str(tmp_path / "missing"), "-o",
                                      str(tmp_path / "peft")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    assert "not a slimtune adapter" in result.stderr and not (tmp_path / "peft").exists()


def test_recorded_cache_path_of_a_registered_model_resolves(tmp_path):
    from slimtune.cli.export_peft import base_model_of

    gone = str(tmp_path / "elsewhere" / "models" / "smollm2-135m")
    assert base_model_of({"base_model": gone}, tmp_path) == "smollm2-135m"
    assert base_model_of({"base_model": "minilm-l6"}, tmp_path) == "minilm-l6"
