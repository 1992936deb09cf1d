"""FactoredLinear and replace_linears: exact algebra on small tensors, then on SmolLM2."""
import copy

import pytest
import torch
from torch import nn

from slimtune.layers import DenseBase, FactoredLinear, LowRank, SparseDelta
from slimtune.targets import factored_layers, match_targets, replace_linears


def full_layer(core_kind="full", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n_in, n_out, r = 12, 10, 3
    W = torch.randn(n_out, n_in, generator=g, dtype=dtype)
    core = {"none": None, "diag": torch.randn(r, generator=g, dtype=dtype),
            "full": torch.randn(r, r, generator=g, dtype=dtype)}[core_kind]
    lowrank = LowRank(torch.randn(r, n_in, generator=g, dtype=dtype),
                      torch.randn(n_out, r, generator=g, dtype=dtype), scale=0.5, core=core)
    idx = torch.randperm(n_in * n_out, generator=g)[:15]
    sparse = SparseDelta((n_out, n_in), idx, torch.randn(15, generator=g, dtype=dtype))
    mask = (torch.rand(n_out, n_in, generator=g) > 0.3).to(dtype)
    bias = torch.randn(n_out, generator=g, dtype=dtype)
    return FactoredLinear(n_in, n_out, DenseBase(W), lowrank, sparse, mask, bias)


def reference_weight(layer):
    """The formula written out: (W ⊙ M) + s·B·K·A + S."""
    lr, sp = layer.lowrank, layer.sparse
    K = torch.eye(lr.rank) if lr.core is None else (
        torch.diag(lr.core) if lr.core.dim() == 1 else lr.core)
    S = torch.zeros(layer.out_features * layer.in_features)
    S[sp.indices] = sp.values.detach()
    W = layer.base.weight * layer.mask + lr.scale * lr.B @ K @ lr.A + S.view(layer.out_features, -1)
    return W.detach()


@pytest.mark.parametrize("core", ["none", "diag", "full"])
def test_forward_matches_formula(core):
    layer = full_layer(core)
    x = torch.randn(4, 5, 12)
    expected = x @ reference_weight(layer).T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dense_weight(), reference_weight(layer))


def test_merge_unmerge_and_to_dense_keep_outputs():
    layer = full_layer()
    x = torch.randn(7, 12)
    before = layer(x)
    base_before = layer.base_weight().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_weight(), base_before, rtol=0, atol=1e-6)
    dense = layer.to_dense()
    assert type(dense) is nn.Linear
    torch.testing.assert_close(dense(x), before, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_trainable_parts():
    layer = full_layer()
    layer(torch.randn(3, 12)).sum().backward()
    assert layer.base.weight.grad is None and layer.bias.grad is None
    for p in (layer.lowrank.A, layer.lowrank.B, layer.lowrank.core, layer.sparse.values):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_state_dict_round_trip_through_description():
    layer = full_layer("diag")
    rebuilt = FactoredLinear.from_description(layer.describe())
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)
    assert rebuilt.describe() == layer.describe()


def test_layer_without_base_is_pure_low_rank_and_merges():
    A, B = torch.randn(2, 6), torch.randn(4, 2)
    layer = FactoredLinear(6, 4, lowrank=LowRank(A, B))
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ (B @ A).T)
    layer.merge()
    torch.testing.assert_close(layer(x), x @ (B @ A).T)
    layer.unmerge()  # no base again (as SLTrain, LOST and SST layers are saved and reloaded)
    assert layer.base is None and not layer.merged
    assert layer.describe()["base"] is None
    torch.testing.assert_close(layer(x), x @ (B @ A).T)


def test_input_dtype_and_device_are_respected():
    layer = full_layer()
    x = torch.randn(2, 12, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.device == x.device
    layer64 = full_layer(dtype=torch.float64)
    assert layer64(torch.randn(2, 12, dtype=torch.float64)).dtype == torch.float64


def test_bad_structures_are_rejected():
    with pytest.raises(ValueError, match="at least one"):
        FactoredLinear(3, 3)
    with pytest.raises(ValueError, match="low-rank factors"):
        LowRank(torch.randn(2, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="core"):
        LowRank(torch.randn(2, 3), torch.randn(4, 2), core=torch.randn(3))


# -- real model -----------------------------------------------------------------------------
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_target_selection_on_smollm2(smollm2):
    model, _ = smollm2
    assert len(match_targets(model, "all-linear")) == 210
    assert "lm_head" not in match_targets(model, "all-linear")
    assert len(match_targets(model, ["q_proj", "v_proj"])) == 60
    assert match_targets(model, ["lm_head"]) == ["lm_head"]
    assert match_targets(model, r"model\.layers\.0\.mlp\..*") == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="match no linear"):
        replace_linears(copy.deepcopy(model), ["no_such_proj"])
    with pytest.raises(ValueError, match="regex"):
        match_targets(model, "([")


def test_wrapping_all_smollm2_projections_keeps_logits(smollm2):
    model, tok = smollm2
    ids = tok("It is a truth universally acknowledged, that a single man", return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = model(ids).logits
    wrapped = copy.deepcopy(model)
    replaced = replace_linears(wrapped, "all-linear")
    assert len(replaced) == 210 and len(factored_layers(wrapped)) == 210
    assert {n.rsplit(".", 1)[1] for n in replaced} == set(PROJECTIONS)
    with torch.inference_mode():
        got = wrapped(ids).logits
    assert (got - expected).abs().max().item() <= 1e-6

    # attach a non-trivial low-rank part to every layer, then merge -> unmerge
    g = torch.Generator().manual_seed(0)
    for layer in replaced.values():
        layer.lowrank = LowRank(0.01 * torch.randn(16, layer.in_features, generator=g),
                                0.01 * torch.randn(layer.out_features, 16, generator=g), scale=2.0)
    with torch.inference_mode():
        unmerged = wrapped(ids).logits
        for layer in replaced.values():
            layer.merge()
        merged = wrapped(ids).logits
        for layer in replaced.values():
            layer.unmerge()
        restored = wrapped(ids).logits
    assert (unmerged - expected).abs().max() > 1e-2  # the low-rank part really changes the output
    scale = unmerged.abs().max().item()
    # merged differs only by float32 summation order, accumulated over 30 blocks
    assert (merged - unmerged).abs().max().item() <= 2e-5 * scale
    assert (restored - unmerged).abs().max().item() <= 1e-5 * scale
    # the round trip itself: every unmerged base weight is the original within 1e-6
    worst = max((layer.base.weight - model.get_submodule(name).weight).abs().max().item()
                for name, layer in replaced.items())
    assert worst <= 1e-6


def test_masked_forward_skips_the_mask_only_while_the_base_is_zero_where_masked():
    g = torch.Generator().manual_seed(3)
    W, x = torch.randn(16, 40, generator=g), torch.randn(5, 40, generator=g)
    mask = torch.rand(16, 40, generator=g) > 0.5
    pruned = FactoredLinear(40, 16, DenseBase(W * mask), mask=mask)
    assert pruned._mask_is_free()  # pruning left zeros: the base's own forward is exact
    torch.testing.assert_close(pruned(x), x @ (W * mask).T, rtol=0, atol=1e-6)
    with torch.no_grad():  # the base changes in place (versioned): the mask matters again
        pruned.base.weight.add_(1.0)
    assert not pruned._mask_is_free()
    torch.testing.assert_close(pruned(x), x @ ((W + 1) * mask).T, rtol=0, atol=1e-5)
    dense = FactoredLinear(40, 16, DenseBase(W.clone()), mask=mask)
    assert not dense._mask_is_free()
    torch.testing.assert_close(dense(x), x @ (W * mask).T, rtol=0, atol=1e-6)
    trainable = FactoredLinear(40, 16, DenseBase(W * mask, trainable=True), mask=mask)
    assert not trainable._mask_is_free()  # gradients must stay masked
