"""The adapter API (``slimtune.adapt.apply / save / load / merge``): validation before any work,
refusals, atomic saving. Models are copies of real SmolLM2 layer-0 projections (q 576x576,
k 192x576, up 1536x576) in a container, or MiniLM as a wrong base."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import slimtune.adapt as adapt
from slimtune.adapt import registry
from slimtune.adapt.lora import init_layer as lora_init_layer
from slimtune.layers import FactoredLinear
from slimtune.targets import factored_layers


@pytest.fixture
def block(smollm2):
    b = smollm2[0].model.layers[0]
    return nn.ModuleDict({"q_proj": copy.deepcopy(b.self_attn.q_proj),
                          "k_proj": copy.deepcopy(b.self_attn.k_proj),
                          "up_proj": copy.deepcopy(b.mlp.up_proj)})


@pytest.fixture
def x():
    return torch.randn(3, 576, generator=torch.Generator().manual_seed(0))


def outputs(model, x):
    with torch.no_grad():
        return {n: m(x) for n, m in model.items()}


def snapshot(model):
    return {k: (p.requires_grad, p.detach().clone()) for k, p in model.named_parameters()}


def assert_untouched(model, snap):
    assert not factored_layers(model)
    assert getattr(model, "slimtune_adapter", None) is None
    now = dict(model.named_parameters())
    assert sorted(now) == sorted(snap)
    for k, (flag, value) in snap.items():
        assert now[k].requires_grad == flag, k
        assert torch.equal(now[k], value), k


def train_a_little(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapt.trainable_parameters(model).values():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


# -- apply: validation before work -------------------------------------------------------------
def test_unknown_method_is_refused_naming_the_known_ones(block):
    snap = snapshot(block)
    with pytest.raises(ValueError, match=r"unknown adapter method 'nosuch'.*lora"):
        adapt.apply(block, "nosuch")
    assert_untouched(block, snap)


@pytest.mark.parametrize("method,params,named", [
    ("lora", {"r": "eight"}, "r"), ("lora", {"r": 0}, "r"), ("lora", {"r": 2.5}, "r"),
    ("lora", {"alpha": -1.0}, "alpha"), ("lora", {"rank": 8}, "rank"),
    ("lora", {"targets": []}, "targets"), ("pissa", {"svd": "fast"}, "svd"),
    ("pissa", {"niter": -1}, "niter"), ("sorsa", {"gamma": "high"}, "gamma"),
    ("sltrain", {"density": 0}, "density"), ("lost", {"density": 1.5}, "density"),
    ("sst", {"update_every": 0}, "update_every"),
])
def test_bad_parameters_are_refused_naming_the_argument(block, method, params, named):
    snap = snapshot(block)
    with pytest.raises(ValueError, match=rf"^adapter \({method}\): .*\b{named}\b"):
        adapt.apply(block, method, progress=False, **params)
    assert_untouched(block, snap)


def test_r_larger_than_a_layer_is_refused_before_the_model_changes(block):
    """q_proj (576) could take r=200, k_proj (192) cannot: nothing may be half-adapted."""
    snap = snapshot(block)
    with pytest.raises(ValueError, match=r"r=200 exceeds min\(out, in\) = 192 of k_proj"):
        adapt.apply(block, "pissa", r=200, progress=False)
    assert_untouched(block, snap)


def test_targets_matching_nothing_are_refused(block):
    with pytest.raises(ValueError, match="match no linear"):
        adapt.apply(block, "lora", targets=["o_proj"], progress=False)


@pytest.fixture
def calib_method(monkeypatch):
    """A throw-away data-driven method (LoRA's init plus a recording ``prepare``), registered
    for one test only."""
    calls = []

    def prepare(model, names, config, calib, progress=True):
        calls.append((list(names), calib))
        return {}

    registry.METHODS.register("calib-test", registry.AdapterConfig, init_layer=lora_init_layer,
                              prepare=prepare)
    yield calls
    registry.METHODS.unregister("calib-test")


def test_data_driven_methods_need_and_check_calibration_data(block, calib_method):
    snap = snapshot(block)
    for calib, message in [(None, "data-driven: pass calib="),
                           (torch.zeros(2, 8), "LongTensor"),
                           (torch.zeros(16, dtype=torch.long), "LongTensor")]:
        with pytest.raises(ValueError, match=message):
            adapt.apply(block, "calib-test", r=4, calib=calib, progress=False)
        assert_untouched(block, snap)
    assert not calib_method  # refused before prepare ran
    ids = torch.zeros(2, 8, dtype=torch.long)
    adapt.apply(block, "calib-test", r=4, calib=ids, progress=False)
    assert len(calib_method) == 1
    assert calib_method[0][0] == ["q_proj", "k_proj", "up_proj"] and calib_method[0][1] is ids


def test_calibration_data_for_a_method_without_it_is_refused(block):
    snap = snapshot(block)
    with pytest.raises(ValueError, match="does not use calibration data"):
        adapt.apply(block, "lora", calib=torch.zeros(2, 8, dtype=torch.long), progress=False)
    assert_untouched(block, snap)


def test_apply_twice_is_refused_until_merged(block, x):
    adapt.apply(block, "lora", r=4, progress=False)
    with pytest.raises(ValueError, match="already has factored layers"):
        adapt.apply(block, "pissa", r=4, progress=False)
    train_a_little(block)
    trained = outputs(block, x)
    adapt.merge(block)
    adapt.apply(block, "pissa", r=4, progress=False)  # a merged model is a plain base again
    for name, out in outputs(block, x).items():
        torch.testing.assert_close(out, trained[name], rtol=1e-4, atol=1e-5)


def test_a_plain_model_has_no_adapter(block, tmp_path):
    for call in (adapt.adapter_config, adapt.extra_loss, lambda m: adapt.after_step(m, 0),
                 lambda m: adapt.save(m, tmp_path / "a")):
        with pytest.raises(ValueError, match="no slimtune adapter"):
            call(block)
    assert not (tmp_path / "a").exists()


# -- save --------------------------------------------------------------------------------------
def test_save_writes_a_manifest_and_refuses_merged_layers(block, tmp_path):
    adapt.apply(block, "pissa", r=4, targets=["q_proj", "k_proj"], progress=False)
    path = adapt.save(block, tmp_path / "adapter")
    manifest = adapt.read_manifest(path)
    assert manifest["config"]["method"] == "pissa" and manifest["config"]["seed"] == 0
    assert sorted(manifest["layers"]) == ["k_proj", "q_proj"]
    assert manifest["trainable"] == sorted(f"{n}.lowrank.{f}" for n in ("k_proj", "q_proj")
                                           for f in "AB")
    assert manifest["dtype"] == "float32"
    block["q_proj"].merge()
    with pytest.raises(ValueError, match="merged"):
        adapt.save(block, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_save_refuses_to_overwrite_unless_asked(block, x, tmp_path):
    adapt.apply(block, "lora", r=4, progress=False)
    path = adapt.save(block, tmp_path / "adapter")
    first = (path / "adapter.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        adapt.save(block, path)
    train_a_little(block)
    adapt.save(block, path, overwrite=True)
    assert (path / "adapter.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    # overwrite=True never replaces something that is not an adapter
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a slimtune adapter"):
        adapt.save(block, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_a_failed_save_leaves_no_temp_dirs_and_keeps_the_old_adapter(block, x, tmp_path,
                                                                     monkeypatch, smollm2):
    import safetensors.torch

    adapt.apply(block, "pissa", r=4, progress=False)
    path = adapt.save(block, tmp_path / "adapter")
    saved = outputs(block, x)
    real_save_file = safetensors.torch.save_file

    def fail_halfway(tensors, filename, *a, **kw):
        real_save_file(tensors, filename, *a, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_halfway)
    train_a_little(block)
    for target, overwrite in ((path, True), (tmp_path / "new", False)):
        with pytest.raises(OSError, match="disk full"):
            adapt.save(block, target, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    monkeypatch.undo()
    fresh = smollm2[0].model.layers[0]
    base = nn.ModuleDict({"q_proj": copy.deepcopy(fresh.self_attn.q_proj),
                          "k_proj": copy.deepcopy(fresh.self_attn.k_proj),
                          "up_proj": copy.deepcopy(fresh.mlp.up_proj)})
    for name, out in outputs(adapt.load(base, path), x).items():  # the old adapter, intact
        torch.testing.assert_close(out, saved[name], rtol=0, atol=0)


# -- load --------------------------------------------------------------------------------------
@pytest.fixture
def saved_adapter(block, tmp_path):
    """A PiSSA adapter on q_proj and k_proj, plus up_proj trained in full (like a task head)."""
    base = copy.deepcopy(block)
    adapt.apply(block, "pissa", r=4, targets=["q_proj", "k_proj"], progress=False)
    block["up_proj"].weight.requires_grad_(True)
    train_a_little(block)
    return base, block, adapt.save(block, tmp_path / "adapter")


def test_load_restores_factors_and_fully_trained_parameters(saved_adapter, x):
    base, trained, path = saved_adapter
    loaded = adapt.load(base, path)
    assert isinstance(loaded["q_proj"], FactoredLinear) and type(loaded["up_proj"]) is nn.Linear
    assert sorted(adapt.trainable_parameters(loaded)) == sorted(
        adapt.trainable_parameters(trained))
    for name, out in outputs(loaded, x).items():
        torch.testing.assert_close(out, outputs(trained, x)[name], rtol=0, atol=0)


def _different_model(base, minilm):
    return copy.deepcopy(minilm[0])


def _mismatched_layer(base, minilm):
    """q_proj matches, k_proj does not: nothing may be half-loaded or frozen."""
    base["k_proj"] = nn.Linear(576, 100, bias=False)
    return base


@pytest.mark.parametrize("make_target, error", [
    (_different_model, "has no layer 'q_proj'"),
    (_mismatched_layer, "k_proj is not a matching nn.Linear"),
])
def test_load_onto_a_wrong_model_is_refused_untouched(saved_adapter, minilm, make_target, error):
    base, _, path = saved_adapter
    target = make_target(base, minilm)
    snap = snapshot(target)
    with pytest.raises(ValueError, match=error):
        adapt.load(target, path)
    assert_untouched(target, snap)


def test_load_refuses_a_model_that_already_has_an_adapter(saved_adapter):
    _, trained, path = saved_adapter
    with pytest.raises(ValueError, match="already has factored layers"):
        adapt.load(trained, path)


def test_load_refuses_inconsistent_files(saved_adapter, tmp_path):
    base, _, path = saved_adapter
    snap = snapshot(base)
    manifest = json.loads((path / "adapter.json").read_text())
    manifest["format"] = 99
    (path / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="unsupported format 99"):
        adapt.load(base, path)
    manifest["format"] = 1
    manifest["layers"]["q_proj"]["lowrank"]["rank"] = 5
    (path / "adapter.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="tensors for q_proj do not match"):
        adapt.load(base, path)
    assert_untouched(base, snap)
    with pytest.raises(FileNotFoundError, match="not a slimtune adapter"):
        adapt.load(base, tmp_path)
