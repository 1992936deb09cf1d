"""Quantisation steps on the layer-by-layer pipeline: a real SmolLM2 quantised, packed, saved and
reloaded exactly; bad settings refused before any work with the layers named."""
import copy

import pytest
import torch

from slimtune.calib import calibration_windows, run_pipeline
from slimtune.compress import METHODS, RecipeError, build_steps, check_targets, load_recipe
from slimtune.compress.quant.common import QuantConfig
from slimtune.layers import FactoredLinear, PackedQuantBase
from slimtune.weights.hessian import layer_hessian
from slimtune.weights.obs import hessian_factor
from slimtune.weights.quant import QuantSpec, dequantize, quantize, round_to_nearest

QUANT = [n for n in METHODS.names() if issubclass(METHODS.get(n).config, QuantConfig)]


@pytest.mark.parametrize("text, message", [
    ("- {method: rtn, bits: 1}", "step 0 (rtn): bits: must be in 2..8, got 1"),
    ("- {method: rtn, bits: 9}", "step 0 (rtn): bits: must be in 2..8, got 9"),
    ("- {method: rtn}", "step 0 (rtn): bits: required parameter is missing"),
    ("- {method: rtn, bits: 4, group_size: 0}", "step 0 (rtn): group_size: must be a positive"),
    ("- {method: rtn, bits: 4, group: 64}", "step 0 (rtn): group: unknown parameter"),
])
def test_bad_quantisation_settings_are_one_recipe_error(text, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(text)


def test_a_group_size_that_does_not_divide_a_layer_is_refused_naming_the_layers(smollm2):
    configs = load_recipe("- {method: rtn, bits: 4, group_size: 128}")
    with pytest.raises(RecipeError, match=r"step 0 \(rtn\): group_size 128 does not divide the "
                                          r"576 inputs \(180 targeted layers, e\.g\. "
                                          r"model\.layers\.0\.self_attn\.q_proj"):
        check_targets(smollm2[0], configs)
    check_targets(smollm2[0], load_recipe("- {method: rtn, bits: 4, group_size: 64}"))


@pytest.mark.parametrize("method", QUANT)
def test_every_quantiser_packs_a_real_model_that_reloads_exactly(method, smollm2, tmp_path):
    from slimtune.io.checkpoint import save_model
    from slimtune.models import load_model

    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    original = {n: m.weight.detach().clone() for n, m in model.named_modules()
                if n.startswith("model.layers.0.") and isinstance(m, torch.nn.Linear)}
    steps = build_steps(load_recipe([{"method": method, "bits": 4, "group_size": 64,
                                      "sym": False, "targets": r"model\.layers\.[01]\..*"}]))
    windows = calibration_windows(tok, "ptb", "train", n=2, seqlen=64, seed=0)
    run_pipeline(model, windows, steps, progress=False)
    for name, W in original.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, FactoredLinear) and isinstance(layer.base, PackedQuantBase)
        assert layer.base.spec == QuantSpec(4, 64, False)
        if method == "rtn":
            q, grid = round_to_nearest(W, QuantSpec(4, 64, False))
            torch.testing.assert_close(layer.dense_weight(), dequantize(q, grid), rtol=0, atol=0)
        # every weight is a point of its grid (GPTQ moves weights to other points than RTN)
        assert torch.equal(quantize(layer.dense_weight(), layer.base.grid()),
                           layer.base.integers())
    summary = steps[0].summary()
    assert summary["bits_per_weight"] == pytest.approx(4 + 32 / 64 + 8 / 64)
    ids = torch.tensor([tok("The quantised model reloads to the same logits.")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
    save_model(model, tok, tmp_path / "q")
    reloaded, _ = load_model(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("method", QUANT)
def test_a_bf16_layer_stays_bf16(method, smollm2):
    linear = copy.deepcopy(smollm2[0].model.layers[5].self_attn.k_proj).to(torch.bfloat16)
    step = build_steps(load_recipe([{"method": method, "bits": 8}]))[0]
    X = torch.randn(256, 576, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    from types import SimpleNamespace

    from slimtune.weights.stats import InputStatistics

    stats = InputStatistics(576)
    stats.update(X)
    new = step.apply("k", linear, SimpleNamespace(inputs=stats, fisher=None))
    x = torch.randn(2, 576, dtype=torch.bfloat16)
    assert new(x).dtype == torch.bfloat16 and new.base.scale.dtype == torch.bfloat16
    ref = linear(x).float()
    assert float((new(x).float() - ref).norm() / ref.norm()) < 0.03


@pytest.mark.parametrize("recipe", [{"method": "gptq", "bits": 4, "act_order": True},
                                    {"method": "sparsegpt", "sparsity": 0.5}])
def test_layers_of_one_input_share_one_hessian_factor(recipe, smollm2, monkeypatch):
    """q/k/v and gate/up read the same input: one H and one Cholesky factor serve each group, so
    a LLaMA block needs 4 factors for its 7 linears (and the results equal unshared ones)."""
    import slimtune.compress.hessian_factors as hf
    from slimtune.weights.stats import InputStatistics

    made = []
    monkeypatch.setattr(hf, "hessian_factor", lambda *a, **k: made.append(1) or
                        hessian_factor(*a, **k))
    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    steps = build_steps(load_recipe([{**recipe, "targets": r"model\.layers\.0\..*"}]))
    run_pipeline(model, calibration_windows(tok, "ptb", "train", n=2, seqlen=64, seed=0), steps,
                 progress=False)
    assert len(made) == 4
    stats = InputStatistics(64, dtype=torch.float32)
    stats.update(torch.randn(200, 64, generator=torch.Generator().manual_seed(0)))
    cache = hf.HessianFactors(0.01, act_order=True)
    first = cache.get(stats, torch.device("cpu"))
    assert cache.get(stats, torch.device("cpu")) is first
    stats.update(torch.randn(20, 64, generator=torch.Generator().manual_seed(1)))
    fresh = cache.get(stats, torch.device("cpu"))  # updated statistics: a new factor
    assert fresh is not first and torch.equal(fresh.H, layer_hessian(stats.gram(), 220))
