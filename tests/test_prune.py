"""Pruning steps (magnitude, wanda, sparsegpt): their settings, the masks they store as bitmasks,
the formula and the error ordering on real SmolLM2 layers and activations."""
import copy
import warnings
from types import SimpleNamespace

import pytest
import torch

from slimtune.calib import calibration_windows, run_pipeline
from slimtune.compress import RecipeError, build_steps, check_targets, load_recipe
from slimtune.compress.prune.magnitude import global_counts
from slimtune.layers import FactoredLinear, storage_bits
from slimtune.weights.sparsity import prune_lowest
from slimtune.weights.stats import InputStatistics

Q0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("step, message", [
    ("{method: magnitude, sparsity: 1.0}", "step 0 (magnitude): sparsity: must be in [0, 1)"),
    ("{method: wanda, sparsity: -0.1}", "step 0 (wanda): sparsity: must be in [0, 1)"),
    ("{method: wanda}", "step 0 (wanda): sparsity: required for an unstructured pattern"),
    ("{method: wanda, pattern: 2:4}", "the base-60 number 124: quote it"),
    ("{method: sparsegpt, pattern: '4:4'}", "step 0 (sparsegpt): pattern: a sparsity pattern"),
    ("{method: sparsegpt, pattern: '2:x'}", "step 0 (sparsegpt): pattern: a sparsity pattern"),
    ("{method: magnitude, pattern: '2:4', sparsity: 0.3}", "contradicts the pattern '2:4'"),
    ("{method: magnitude, pattern: '2:4', scope: global}", "scope: 'global' sets one threshold"),
    ("{method: sparsegpt, pattern: '2:3'}", "block_size: 128 is not a multiple of M=3"),
    ("{method: magnitude, sparsity: 0.5, scope: model}", "step 0 (magnitude): scope: must be"),
])
def test_bad_pruning_settings_are_one_recipe_error(step, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(f"- {step}")
    assert message in str(err.value)


def test_an_m_that_does_not_divide_a_layer_is_refused_before_work(smollm2):
    from slimtune.models import model_skeleton

    configs = load_recipe("- {method: wanda, pattern: '3:7'}")
    for model in (model_skeleton("smollm2-135m"), smollm2[0]):  # weightless skeleton, loaded
        with pytest.raises(RecipeError, match=r"step 0 \(wanda\): pattern '3:7': M=7 does not "
                                              r"divide the input width 576 \(180 targeted"):
            check_targets(model, configs)


def layer_stats(X):
    stats = InputStatistics(X.shape[1])
    stats.update(X)
    return SimpleNamespace(inputs=stats, fisher=None, original=None)


@pytest.fixture(scope="module")
def block0_inputs(smollm2):
    """Real inputs of block 0's q_proj and down_proj on 8 PTB windows of 128 tokens."""
    model, tok = smollm2
    windows = calibration_windows(tok, "ptb", "train", n=8, seqlen=128, seed=1)
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.setdefault(n, []).append(args[0].detach().reshape(
            -1, args[0].shape[-1]))) for n in (Q0, DOWN0)]
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def output_error(W, W_hat, X):
    return float(((X @ (W.double() - W_hat.double()).T).norm() / (X @ W.double().T).norm()))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_on_real_layers_sparsegpt_beats_wanda_beats_magnitude(pattern, smollm2, block0_inputs):
    """The literature's ordering at equal sparsity, on the layer output error ||X (W - Ŵ)ᵀ||."""
    for name in (Q0, DOWN0):
        W, X = smollm2[0].get_submodule(name).weight.detach(), block0_inputs[name]
        errors = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            step = build_steps(load_recipe([{"method": method, "sparsity": 0.5,
                                             "pattern": pattern}]))[0]
            layer = step.apply(name, copy.deepcopy(smollm2[0].get_submodule(name)),
                               layer_stats(X.float()))
            assert isinstance(layer, FactoredLinear) and layer.mask_bits.dtype == torch.uint8
            assert layer.mask_bits.shape == (W.shape[0], W.shape[1] // 8)  # one bit per weight
            assert int((~layer.mask).sum()) == W.numel() // 2
            assert (layer.base_weight()[~layer.mask] == 0).all()
            if pattern == "2:4":
                assert (layer.mask.reshape(W.shape[0], -1, 4).sum(-1) == 2).all()
            errors[method] = output_error(W, layer.dense_weight(), X)
        assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], (name, errors)


def test_wanda_on_real_activations_equals_the_formula(smollm2, block0_inputs):
    """In the pipeline, block 0's masks are |W_ij|·||X_j||₂ pruned per row (inputs of block 0
    are the embeddings; with sequential="block" its layers' statistics are all taken before any
    of them is pruned, so they equal the uncompressed model's)."""
    model = copy.deepcopy(smollm2[0])
    windows = calibration_windows(smollm2[1], "ptb", "train", n=8, seqlen=128, seed=1)
    steps = build_steps(load_recipe([{"method": "wanda", "sparsity": 0.5,
                                      "targets": [Q0, DOWN0]}]))
    run_pipeline(model, windows, steps, progress=False, sequential="block")
    for name in (Q0, DOWN0):
        W, X = smollm2[0].get_submodule(name).weight.detach().double(), block0_inputs[name]
        scores = W.abs() * X.square().sum(0).sqrt()[None, :]
        keep = scores.shape[1] // 2
        threshold = scores.sort(dim=1, descending=True).values[:, keep - 1:keep]
        layer = model.get_submodule(name)
        mask = layer.mask
        assert (mask.sum(1) == keep).all()
        # every kept score is >= every pruned score of its row (up to summation order)
        kept_min = torch.where(mask, scores, torch.inf).min(1).values
        pruned_max = torch.where(mask, -torch.inf, scores).max(1).values
        assert (kept_min >= pruned_max * (1 - 1e-9)).all()
        assert torch.allclose(kept_min, threshold.squeeze(1), rtol=1e-9)
        torch.testing.assert_close(layer.dense_weight(), (W * mask).float(), rtol=0, atol=0)


def test_global_magnitude_prunes_exactly_with_a_floor_per_layer():
    g = torch.Generator().manual_seed(0)
    weights = {"small": torch.randn(8, 64, generator=g) * 0.01,
               "big": torch.randn(16, 64, generator=g), "ties": torch.ones(4, 64) * 0.5}
    total = sum(w.numel() for w in weights.values())
    counts = global_counts(weights, 0.5, min_keep=0.05)
    assert sum(counts.values()) == int(0.5 * total)
    assert counts["small"] == 512 - 26  # the floor: keeps ceil(0.05 * 512)
    # one threshold over the layers not held at their floor: 0.5, where the tied layer sits
    # (its entries are split so that the total is exact)
    masks = {n: prune_lowest(w.abs(), counts[n]) for n, w in weights.items()}
    assert 0 < counts["ties"] < 256
    assert float(weights["big"].abs()[~masks["big"]].max()) <= 0.5
    assert float(weights["big"].abs()[masks["big"]].min()) >= 0.5
    with pytest.raises(ValueError, match="min_keep"):
        global_counts(weights, 0.99, min_keep=0.05)


def test_global_magnitude_on_the_real_model(smollm2):
    model = copy.deepcopy(smollm2[0])
    names = [f"model.layers.{i}.{p}" for i in (0, 1) for p in
             ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]
    steps = build_steps(load_recipe([{"method": "magnitude", "sparsity": 0.6, "scope": "global",
                                      "targets": names}]))
    windows = calibration_windows(smollm2[1], "ptb", "train", n=1, seqlen=32, seed=0)
    run_pipeline(model, windows, steps, progress=False)
    pruned = {n: int((~model.get_submodule(n).mask).sum()) for n in names}
    sizes = {n: model.get_submodule(n).mask.numel() for n in names}
    assert sum(pruned.values()) == int(0.6 * sum(sizes.values()))
    assert len(set(pruned.values())) > 2  # one threshold, different fractions per layer
    kept = min(float(model.get_submodule(n).base_weight().abs()[model.get_submodule(n).mask]
                     .min()) for n in names if pruned[n] < 0.95 * sizes[n])
    cut = max(float(smollm2[0].get_submodule(n).weight.detach().abs()[~model.get_submodule(n).mask].max())
              for n in names)
    assert cut <= kept


def test_gptq_after_pruning_keeps_the_zeros_and_beats_rtn(smollm2, block0_inputs):
    W, X = smollm2[0].get_submodule(DOWN0).weight.detach(), block0_inputs[DOWN0]
    errors = {}
    for quant in ("rtn", "gptq"):
        layer = copy.deepcopy(smollm2[0].get_submodule(DOWN0))
        for step in build_steps(load_recipe([{"method": "sparsegpt", "pattern": "2:4"},
                                             {"method": quant, "bits": 4, "group_size": 64}])):
            layer = step.apply(DOWN0, layer, layer_stats(X.float()))
        mask = layer.mask
        assert (layer.dense_weight()[~mask] == 0).all()  # exactly zero, not merely small
        zero = layer.base.zero.to(torch.int32).repeat_interleave(64, dim=1)
        assert torch.equal(layer.base.integers()[~mask], zero[~mask])
        assert storage_bits(layer) == 8 * (layer.base.packed.numel() + 4 * layer.base.scale.numel()
                                           + layer.base.zero.numel() + layer.mask_bits.numel())
        errors[quant] = output_error(W, layer.dense_weight(), X)
    assert errors["gptq"] < errors["rtn"], errors
