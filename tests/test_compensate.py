"""Low-rank and sparse parts beside a compressed base: eora, lowrank_first, outliers, lost --
their math, recipe order, and a composed recipe (sparsegpt 2:4 -> gptq 4-bit -> eora 32) on the
real SmolLM2 that reloads to identical logits."""
import copy
from types import SimpleNamespace

import pytest
import torch

from slimtune.compress import RecipeError, build_steps, check_targets, load_recipe
from slimtune.weights.compensation import eora_factors, principal_split
from slimtune.weights.stats import InputStatistics
from slimtune.weights.svd import truncated_svd

DOWN3 = "model.layers.3.mlp.down_proj"


def test_eora_with_identity_covariance_is_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(40, 24, generator=g, dtype=torch.float64)
    A, B = eora_factors(delta, torch.eye(24, dtype=torch.float64), 5)
    U, S, Vh = truncated_svd(delta, 5)
    torch.testing.assert_close(B @ A, U @ torch.diag(S) @ Vh, rtol=1e-10, atol=1e-12)


def stats_of(X, original=None):
    stats = InputStatistics(X.shape[1])
    stats.update(X)
    return SimpleNamespace(inputs=stats, fisher=None, original=original)


@pytest.fixture(scope="module")
def down3_inputs(smollm2):
    from slimtune.calib import calibration_windows

    model, tok = smollm2
    seen = []
    hook = model.get_submodule(DOWN3).register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(calibration_windows(tok, "ptb", "train", n=16, seqlen=128, seed=2))
    hook.remove()
    return torch.cat(seen)


def test_eora_repairs_gptq_on_real_inputs_better_than_svd_and_more_with_rank(smollm2,
                                                                             down3_inputs):
    X = down3_inputs.double()
    original = smollm2[0].get_submodule(DOWN3)
    W = original.weight.detach()
    layer = build_steps(load_recipe("- {method: gptq, bits: 3, group_size: 64}"))[0].apply(
        DOWN3, copy.deepcopy(original), stats_of(down3_inputs))
    delta = W.double() - layer.dense_weight().double()

    def on_inputs(D):
        return float((X @ D.T).norm())

    C = X.T @ X / X.shape[0]
    errors = []
    for rank in (8, 16, 32, 64):
        A, B = eora_factors(delta, C, rank)
        U, S, Vh = truncated_svd(delta, rank)
        errors.append(on_inputs(delta - B @ A))
        assert errors[-1] < on_inputs(delta - U @ torch.diag(S) @ Vh)  # the eigenspace matters
    assert errors == sorted(errors, reverse=True) and errors[0] < on_inputs(delta)
    step = build_steps(load_recipe("- {method: rtn, bits: 4}\n- {method: eora, rank: 16}"))[1]
    new = step.apply(DOWN3, copy.deepcopy(layer), stats_of(down3_inputs, original=W))
    assert new.lowrank.rank == 16 and not new.lowrank.A.requires_grad
    assert step.report[DOWN3]["error_after"] < step.report[DOWN3]["error_before"]


def test_compensating_with_nothing_compressed_before_is_a_recipe_error(smollm2):
    with pytest.raises(RecipeError, match=r"step 0 \(eora\): compensates what earlier steps "
                                          r"lost, but no step before it compresses"):
        load_recipe("- {method: eora, rank: 8}")
    configs = load_recipe("- {method: rtn, bits: 4, targets: [q_proj]}\n"
                          "- {method: eora, rank: 8}")
    with pytest.raises(RecipeError, match=r"step 1 \(eora\): targets: 180 layers that no "
                                          r"earlier step compresses"):
        check_targets(smollm2[0], configs)
    step = build_steps(load_recipe("- {method: rtn, bits: 4}\n- {method: eora, rank: 8}"))[1]
    linear = smollm2[0].get_submodule(DOWN3)
    with pytest.raises(ValueError, match="nothing to compensate"):
        step.apply(DOWN3, linear, stats_of(torch.randn(64, 1536),
                                           original=linear.weight.detach()))
    with pytest.raises(RecipeError, match=r"rank 700 exceeds min\(out, in\) = 576"):
        check_targets(smollm2[0], load_recipe("- {method: rtn, bits: 4}\n"
                                              "- {method: eora, rank: 700}"))


def test_lowrank_first_keeps_the_principal_part_and_quantises_the_rest(smollm2, down3_inputs):
    W = smollm2[0].get_submodule(DOWN3).weight.detach()
    first, quant = build_steps(load_recipe("- {method: lowrank_first, rank: 16}\n"
                                           "- {method: rtn, bits: 3, group_size: 64}"))
    layer = first.apply(DOWN3, copy.deepcopy(smollm2[0].get_submodule(DOWN3)), None)
    torch.testing.assert_close(layer.dense_weight(), W, rtol=0, atol=1e-6)  # nothing lost yet
    A, B, rest = principal_split(W, 16)
    torch.testing.assert_close(layer.lowrank.delta_weight().double(), B @ A, rtol=1e-5,
                               atol=1e-7)
    layer = quant.apply(DOWN3, layer, None)
    assert layer.lowrank.rank == 16 and layer.base.kind == "packed_int"
    from slimtune.weights.quant import QuantSpec, round_to_nearest

    plain = round_to_nearest(W, QuantSpec(3, 64, True))
    from slimtune.weights.quant import dequantize

    X = down3_inputs.double()
    err = lambda V: float((X @ (W.double() - V.double()).T).norm())  # noqa: E731
    assert err(layer.dense_weight()) < err(dequantize(*plain))


def test_outliers_are_kept_exactly_and_the_quantiser_sees_the_rest(smollm2, down3_inputs):
    W = smollm2[0].get_submodule(DOWN3).weight.detach()
    for by in ("magnitude", "hessian"):
        outl, quant = build_steps(load_recipe(f"- {{method: outliers, fraction: 0.01, by: {by}}}\n"
                                              "- {method: rtn, bits: 3, group_size: 64}"))
        layer = outl.apply(DOWN3, copy.deepcopy(smollm2[0].get_submodule(DOWN3)),
                           stats_of(down3_inputs))
        idx = layer.sparse.indices
        assert layer.sparse.nnz == int(0.01 * W.numel())
        assert (layer.base.weight.reshape(-1)[idx] == 0).all()
        score = W.double().square() if by == "magnitude" else (
            W.double().square() * down3_inputs.double().square().sum(0))
        assert float(score.reshape(-1)[idx].min()) >= float(
            score.reshape(-1).sort(descending=True).values[idx.numel() - 1])
        layer = quant.apply(DOWN3, layer, None)
        # the base's zero there quantises to exactly 0, so the layer applies W itself there
        torch.testing.assert_close(layer.dense_weight().reshape(-1)[idx], W.reshape(-1)[idx],
                                   rtol=0, atol=0)


def test_lost_is_the_principal_part_plus_the_largest_residual_entries(smollm2):
    W = smollm2[0].get_submodule(DOWN3).weight.detach()
    step = build_steps(load_recipe("- {method: lost, rank: 32, sparsity: 0.9}"))[0]
    layer = step.apply(DOWN3, copy.deepcopy(smollm2[0].get_submodule(DOWN3)), None)
    assert layer.base is None and layer.lowrank.rank == 32
    A, B, rest = principal_split(W, 32)
    kept = rest.numel() - int(0.9 * rest.numel())
    assert layer.sparse.nnz == kept
    dropped = rest.abs().reshape(-1).sort().values[: rest.numel() - kept]
    error = (W.double() - layer.dense_weight().double()).norm()
    assert float(error) == pytest.approx(float(dropped.norm()), rel=1e-4)


def test_the_composed_recipe_runs_in_one_pass_and_reloads_identically(smollm2, tmp_path):
    import warnings
    from pathlib import Path

    from slimtune.calib import calibration_windows, run_pipeline
    from slimtune.io.checkpoint import save_model
    from slimtune.layers import storage_report
    from slimtune.models import load_model

    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" /
                         "sparsegpt_gptq_eora.yaml")
    configs = load_recipe([{**c.model_dump(), "targets": r"model\.layers\.1\..*"}
                           for c in recipe])
    windows = calibration_windows(tok, "ptb", "train", n=4, seqlen=128, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = run_pipeline(model, windows, build_steps(configs), progress=False)
    names = report["steps"][0]["layers"]
    assert len(names) == 7 and all(e["layers"] == names for e in report["steps"])
    layer = model.get_submodule("model.layers.1.self_attn.o_proj")
    assert layer.base.kind == "packed_int" and layer.lowrank.rank == 32
    assert (layer.base_weight()[~layer.mask] == 0).all()
    storage = storage_report(model, names)
    weights = storage["weights"]
    lowrank_bits = 32 * 32 * sum(model.get_submodule(n).in_features
                                 + model.get_submodule(n).out_features for n in names)
    rows = sum(model.get_submodule(n).out_features for n in names)
    # 4-bit integers, a float32 scale and an int8 zero per row, a 1-bit mask, float32 factors
    assert storage["bits_per_weight"] == pytest.approx(
        (4 * weights + 40 * rows + weights + lowrank_bits) / weights)
    ids = torch.tensor([tok("Pruned, quantised and repaired, it reloads the same.")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
    save_model(model, tok, tmp_path / "c")
    reloaded, _ = load_model(tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=0, atol=0)
