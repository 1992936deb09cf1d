"""The compress family's shared matrix: every registered step, run by its example recipe
(recipes/<name>.yaml) on block 0 of the real SmolLM2 -- apply, forward, save/load to identical
logits, dtype kept, and the storage it reports."""
import copy
import warnings
from pathlib import Path

import pytest
import torch

from slimtune.calib import calibration_windows, run_pipeline
from slimtune.compress import METHODS, build_steps, load_recipe
from slimtune.layers import FactoredLinear, storage_bits

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
BLOCK0 = r"model\.layers\.0\..*"


def block0_recipe(name):
    configs = load_recipe(RECIPES_DIR / f"{name}.yaml")
    return load_recipe([{**c.model_dump(), "targets": BLOCK0} for c in configs])


@pytest.fixture(scope="module")
def short(smollm2):
    """The real SmolLM2 cut to its first two blocks (the matrix saves and reloads it often)."""
    model = copy.deepcopy(smollm2[0])
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.config.layer_types = model.config.layer_types[:2] if getattr(
        model.config, "layer_types", None) else None
    return model, smollm2[1]


@pytest.fixture(scope="module")
def windows(smollm2):
    return calibration_windows(smollm2[1], "ptb", "train", n=4, seqlen=64, seed=0)


def text_ids(tok):
    return torch.tensor([tok("Every compression step keeps a model that runs and reloads.")
                         ["input_ids"]])


@pytest.mark.parametrize("method", METHODS.names())
def test_every_step_applies_runs_saves_and_reloads(method, short, windows, tmp_path):
    from slimtune.io.checkpoint import save_model
    from slimtune.models import load_model

    model, tok = copy.deepcopy(short[0]), short[1]
    names = [n for n, m in model.named_modules()
             if n.startswith("model.layers.0.") and isinstance(m, torch.nn.Linear)]
    configs = block0_recipe(method)
    assert method in [c.method for c in configs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 256 calibration tokens are few
        report = run_pipeline(model, windows, build_steps(configs), progress=False)
    assert all(sorted(e["layers"]) == sorted(names) for e in report["steps"])
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, FactoredLinear)
        assert all(p.dtype == torch.float32 for p in layer.parameters())
        assert 0 < storage_bits(layer)
    ids = text_ids(tok)
    with torch.no_grad():
        logits, dense = model(ids).logits, short[0](ids).logits
    assert torch.isfinite(logits).all()
    assert 0 < float((logits - dense).norm() / dense.norm()) < 0.5  # changed, not broken
    save_model(model, tok, tmp_path / "m")
    reloaded, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_step_keeps_a_bf16_model_bf16(method, short, windows):
    model = copy.deepcopy(short[0]).to(torch.bfloat16)
    steps = build_steps(block0_recipe(method))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run_pipeline(model, windows, steps, progress=False)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, FactoredLinear)
    assert {t.dtype for t in layer.state_dict().values()
            if t.is_floating_point()} == {torch.bfloat16}
    with torch.no_grad():
        out = model(text_ids(short[1])).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
