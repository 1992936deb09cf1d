"""Low-rank compression steps (svd, fwsvd, asvd, svd_llm) and rank allocation (uniform, welore,
sensitivity), on SmolLM2's real layer-1 weights and calibration inputs.

Statistics are passed as a duck-typed ``LayerStats`` (``.inputs``, ``.fisher``) as the pipeline
does.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtune.compress.lowrank.allocation import (
    CurvePoint, allocate_by_loss, budget, kept_params, loss_curve, truncation_losses, welore_ranks)
from slimtune.compress import METHODS as COMPRESS_METHODS
from slimtune.compress.lowrank.config import LowRankConfig
from slimtune.compress.lowrank.fwsvd import fisher_weighted_factors
from slimtune.compress.lowrank.steps import AllocatedLowRankStep, LowRankStep, factored_linear
from slimtune.compress.lowrank.svd import svd_factors
from slimtune.compress.lowrank.svd_llm import whitened_factors
from slimtune.layers import FactoredLinear
from slimtune.compress.recipe import build_steps, load_recipe
from slimtune.weights.stats import InputStatistics
from slimtune.weights.svd import rank_for_ratio

# every registered low-rank method (a new one joins the matrix below by registering itself)
METHODS = [n for n in COMPRESS_METHODS.names()
           if issubclass(COMPRESS_METHODS.get(n).config, LowRankConfig)]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two shared cores: threaded SVDs can stall badly under contention; one thread is steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def layer1(smollm2, ptb_test_ids):
    """Real inputs of every linear in SmolLM2's block 1 over two 512-token PTB test windows
    (1024 tokens, contextual hidden states), and a synthetic positive Fisher per weight."""
    model, _ = smollm2
    block = model.model.layers[1]
    linears = {n: block.get_submodule(n) for n in LINEARS}
    stats = {n: InputStatistics(m.in_features) for n, m in linears.items()}
    inputs = {}

    def hook(name):
        def pre(module, args):
            stats[name].update(args[0])
            if name == "self_attn.q_proj":
                inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            model(ptb_test_ids[:1024].view(2, 512))
    finally:
        for h in handles:
            h.remove()
    g = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(m.weight.shape, generator=g, dtype=torch.float64) + 0.1
              for n, m in linears.items()}
    return SimpleNamespace(linears=linears, X=inputs["self_attn.q_proj"],
                           stats={n: SimpleNamespace(inputs=stats[n], fisher=fisher[n])
                                  for n in LINEARS})


def step_for(method, ratio=0.5, **extra):
    return build_steps(load_recipe([{"method": method, "ratio": ratio, **extra}]))[0]


def with_bias(linear, seed=0):
    """A copy of a real (bias-free) SmolLM2 linear with a random bias added."""
    new = nn.Linear(linear.in_features, linear.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(linear.weight)
        g = torch.Generator().manual_seed(seed)
        new.bias.copy_(torch.randn(linear.out_features, generator=g))
    return new


def calibration_loss(W, Wk, X):
    D = (W.detach().double() - Wk.detach().double()) @ X.double().T
    return float(D.square().sum())


# -- the shared matrix every method passes -------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_method_replaces_a_real_layer_with_the_rank_k_matrix_it_claims(method, layer1):
    name = "self_attn.k_proj"  # 192 x 576, not square
    linear = with_bias(layer1.linears[name])
    stats = layer1.stats[name]
    m, n = linear.weight.shape
    ratio = 0.6
    step = step_for(method, ratio)
    assert isinstance(step, LowRankStep) and not hasattr(step, "measure")  # one pass only
    new = step.apply(name, linear, stats)
    k = rank_for_ratio(m, n, ratio)
    assert isinstance(new, FactoredLinear) and new.base is None and new.lowrank.rank == k
    assert sum(p.numel() for p in new.lowrank.parameters()) == k * (m + n) <= ratio * m * n
    assert new.lowrank.A.dtype == new.lowrank.B.dtype == torch.float32
    assert step.report[name] == {"rank": k, "params": k * (m + n), "dense_params": m * n}

    U, S, Vh = step.factorise(linear.weight, stats, k)  # the method's own rank-k claim
    Wk = ((U * S) @ Vh).float()
    x = layer1.X[:64]
    expected = F.linear(x, Wk, linear.bias)
    out = new(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new.dense_weight(), Wk, rtol=1e-4, atol=1e-5)
    # balanced split: B = U_k sqrt(S_k), A = sqrt(S_k) Vh_k
    root = S[:k].sqrt()
    torch.testing.assert_close(new.lowrank.B, (U[:, :k] * root).float(), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(new.lowrank.A, (root[:, None] * Vh[:k]).float(), rtol=1e-3,
                               atol=1e-4)

    # float64 inputs come back float64 with the same values
    out64 = new(x.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out, rtol=1e-4, atol=1e-4)

    # merge / unmerge keep the output
    new.merge()
    torch.testing.assert_close(new(x), out, rtol=1e-4, atol=1e-4)
    new.unmerge()
    torch.testing.assert_close(new(x), out, rtol=1e-5, atol=1e-5)

    # state_dict round trip through describe() / from_description()
    rebuilt = FactoredLinear.from_description(new.describe())
    rebuilt.load_state_dict(new.state_dict())
    torch.testing.assert_close(rebuilt(x), out, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_method_keeps_the_weight_dtype(method, layer1):
    name = "self_attn.v_proj"
    linear = nn.Linear(576, 192, bias=False, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(layer1.linears[name].weight)
    new = step_for(method, 0.4).apply(name, linear, layer1.stats[name])
    assert new.lowrank.A.dtype == new.lowrank.B.dtype == torch.float64
    assert new(layer1.X[:4]).dtype == torch.float32


def test_method_without_its_statistics_says_what_is_missing(layer1):
    linear = layer1.linears["self_attn.k_proj"]
    empty = SimpleNamespace(inputs=None, fisher=None)
    for method, needs in [("fwsvd", "Fisher"), ("asvd", "mean |x|"), ("svd_llm", "Gram")]:
        step = step_for(method)
        assert method in str(step) and step.needs
        with pytest.raises(ValueError, match=needs):
            step.apply("k", linear, empty)
    assert step_for("svd").needs == frozenset()
    assert step_for("svd", allocation="sensitivity").needs == {"gram"}


# -- method claims ---------------------------------------------------------------------------------
def test_svd_llm_calibration_loss_is_the_dropped_whitened_spectrum(layer1):
    """SVD-LLM's whitening property, in float64: ||(W - W_k) X^T||^2 = sum_{i>k} sigma_i(W S)^2."""
    name = "self_attn.q_proj"
    X = layer1.X.double()  # 1024 contextual tokens x 576 features: full column rank
    stats = InputStatistics(576)
    stats.update(X)
    linear = nn.Linear(576, 576, bias=False, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(layer1.linears[name].weight)
    W = linear.weight.detach()
    sigma = whitened_factors(W, stats.gram(), damp=0.0)[1]
    for ratio in (0.3, 0.6):
        k = rank_for_ratio(576, 576, ratio)
        new = step_for("svd_llm", ratio, damp=0.0).apply(
            name, linear, SimpleNamespace(inputs=stats, fisher=None))
        assert new.lowrank.rank == k
        loss = calibration_loss(W, new.dense_weight(), X)
        dropped = float(sigma[k:].square().sum())
        assert loss == pytest.approx(dropped, rel=1e-4)


def test_svd_at_full_rank_reconstructs_the_weight(layer1):
    W = layer1.linears["self_attn.k_proj"].weight.detach()
    U, S, Vh = svd_factors(W)
    full = factored_linear(U, S, Vh, min(W.shape), None, W.dtype, W.device)
    torch.testing.assert_close(full.dense_weight(), W, rtol=0, atol=1e-5)
    # a matrix of rank 8 is reproduced exactly by any step keeping k >= 8
    g = torch.Generator().manual_seed(0)
    low = nn.Linear(60, 40, bias=False)
    with torch.no_grad():
        low.weight.copy_(torch.randn(40, 8, generator=g) @ torch.randn(8, 60, generator=g))
    new = step_for("svd", 0.5).apply("x", low, None)
    assert new.lowrank.rank == 12
    torch.testing.assert_close(new.dense_weight(), low.weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj"])
def test_activation_aware_methods_beat_plain_svd_on_real_activations(name, layer1):
    linear, stats = layer1.linears[name], layer1.stats[name]
    W = linear.weight.detach()
    G = stats.inputs.gram()
    losses = {}
    for method in ("svd", "asvd", "svd_llm"):
        Wk = step_for(method, 0.5).apply(name, linear, stats).dense_weight().detach().double()
        dW = W.double() - Wk
        losses[method] = float(torch.einsum("ij,jk,ik->", dW, G, dW))  # ||dW X^T||^2
    assert losses["asvd"] < losses["svd"]
    assert losses["svd_llm"] < losses["asvd"]


def test_fwsvd_with_uniform_fisher_is_plain_svd(layer1):
    name = "self_attn.k_proj"
    linear = layer1.linears[name]
    uniform = SimpleNamespace(inputs=None, fisher=torch.full(linear.weight.shape, 3.0))
    a = step_for("fwsvd", 0.5).apply(name, linear, uniform).dense_weight().detach()
    b = step_for("svd", 0.5).apply(name, linear, None).dense_weight().detach()
    assert float((a - b).norm() / b.norm()) < 1e-5  # the same matrix up to float32 round-off


@pytest.mark.parametrize("weighting", ["input", "output"])
def test_fwsvd_weights_important_features(weighting):
    """A feature (input column / output row) with a large Fisher is reconstructed much better than
    by plain SVD."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(30, 20, generator=g, dtype=torch.float64)
    fisher = torch.ones(30, 20, dtype=torch.float64)
    if weighting == "input":
        fisher[:, 0] = 1e4
    else:
        fisher[0] = 1e4
    U, S, Vh = fisher_weighted_factors(W, fisher, 4, weighting=weighting)
    Us, Ss, Vhs = svd_factors(W, 4)
    pick = (lambda M: M[:, 0]) if weighting == "input" else (lambda M: M[0])
    err_fw = pick((U * S) @ Vh - W).norm()
    err_svd = pick((Us * Ss) @ Vhs - W).norm()
    assert err_fw < 0.1 * err_svd


def test_fwsvd_rejects_an_unknown_weighting():
    W = torch.randn(6, 4)
    with pytest.raises(ValueError, match="weighting"):
        fisher_weighted_factors(W, torch.ones(6, 4), 2, weighting="rows")


# -- allocation -----------------------------------------------------------------------------------
def test_truncation_losses_match_the_direct_computation():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 9, generator=g, dtype=torch.float64)
    X = torch.randn(50, 9, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 9,
                                                                              dtype=torch.float64)
    fisher = torch.rand(12, 9, generator=g, dtype=torch.float64) + 0.05
    U, S, Vh = fisher_weighted_factors(W, fisher)  # folded left factor: not orthonormal
    losses = truncation_losses(U, S, Vh, X.T @ X)
    for k in range(10):
        Wk = (U[:, :k] * S[:k]) @ Vh[:k]
        assert float(losses[k]) == pytest.approx(calibration_loss(W, Wk, X), rel=1e-9, abs=1e-9)


@pytest.fixture(scope="module")
def measured(layer1):
    """welore and sensitivity steps (svd_llm) measured on the 7 real linears of block 1."""
    steps = {a: step_for("svd_llm", 0.6, allocation=a) for a in ("welore", "sensitivity")}
    for step in steps.values():
        assert isinstance(step, AllocatedLowRankStep)
        for n in LINEARS:
            step.measure(n, layer1.linears[n], layer1.stats[n])
        step.allocate()
    return steps


def test_welore_hits_the_global_budget_within_one_rank_per_matrix(measured):
    step = measured["welore"]
    shapes = step.shapes
    total = sum(r["params"] for r in step.report.values())
    target = budget(shapes, 0.6)
    assert total <= target
    assert target - total < sum(m + n for m, n in shapes.values())
    ranks = {n: step.plan[n] for n in LINEARS}
    assert len(set(ranks.values())) > 1  # not uniform: spectra differ between matrices


def test_welore_leaves_flat_spectra_dense_and_reports_it():
    g = torch.Generator().manual_seed(0)
    shapes = {"flat": (64, 64), "steep": (64, 64)}
    spectra = {"flat": torch.linspace(1.0, 0.9, 64), "steep": 0.5 ** torch.arange(64.0)}
    ranks = welore_ranks(spectra, shapes, 0.6)
    assert ranks["flat"] is None and ranks["steep"] >= 1
    total = sum(kept_params(64, 64, k) for k in ranks.values())
    assert total <= budget(shapes, 0.6)
    # the step reports it: dense() lists it and apply returns the layer unchanged
    step = AllocatedLowRankStep("svd", "all-linear", frozenset(),
                                lambda W, stats, rank: svd_factors(W, rank), 0.6, "welore")
    layers = {}
    for name, s in spectra.items():
        U, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
        V, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
        layers[name] = nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            layers[name].weight.copy_((U * s) @ V.T)
        step.measure(name, layers[name], None)
    step.allocate()
    assert step.dense() == ["flat"] == step.summary()["dense"]
    assert step.summary()["kept_ratio"] <= 0.6
    assert step.apply("flat", layers["flat"], None) is layers["flat"]
    assert isinstance(step.apply("steep", layers["steep"], None), FactoredLinear)


def test_sensitivity_fits_the_budget_with_no_more_loss_than_uniform(measured):
    step = measured["sensitivity"]
    target = budget(step.shapes, 0.6)
    total = sum(r["params"] for r in step.report.values())
    assert total <= target
    chosen = sum(next(p.loss for p in step.curves[n] if p.rank == step.plan[n]) for n in LINEARS)
    uniform = sum(next(p.loss for p in step.curves[n] if p.ratio == 0.6) for n in LINEARS)
    assert chosen <= uniform
    assert len(set(r["params"] / r["dense_params"] for r in step.report.values())) > 1


def test_allocated_step_applies_the_planned_ranks(measured, layer1):
    step = measured["sensitivity"]
    for n in ("self_attn.k_proj", "mlp.down_proj"):
        new = step.apply(n, layer1.linears[n], layer1.stats[n])
        k = step.plan[n]
        if k is None:
            assert new is layer1.linears[n]
        else:
            assert new.lowrank.rank == k
    fresh = step_for("svd", 0.5, allocation="welore")
    with pytest.raises(RuntimeError, match="measuring pass"):
        fresh.apply("x", layer1.linears["self_attn.k_proj"], None)


def test_allocate_by_loss_beats_uniform_on_convex_curves():
    curves, baseline = {}, {}
    for i, steep in enumerate((0.5, 2.0, 8.0)):
        m = n = 100
        pts = [CurvePoint(r, rank_for_ratio(m, n, r), rank_for_ratio(m, n, r) * 200,
                          (1 - r) ** steep) for r in (0.2, 0.4, 0.6, 0.8)]
        pts.append(CurvePoint(1.0, None, m * n, 0.0))
        curves[f"l{i}"], baseline[f"l{i}"] = pts, 2
    target = 0.6 * 3 * 100 * 100
    chosen = allocate_by_loss(curves, target, baseline)
    assert sum(p.params for p in chosen.values()) <= target
    assert sum(p.loss for p in chosen.values()) < sum(curves[n][2].loss for n in curves)


def test_loss_curve_normalises_and_marks_dense():
    losses = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    pts = loss_curve(losses, 8, 4, [0.5, 1.0])
    assert pts[0].rank == rank_for_ratio(8, 4, 0.5) == 1 and pts[0].loss == 0.5
    assert pts[-1] == CurvePoint(1.0, None, 32, 0.0)


@pytest.mark.parametrize("method", ["svd", "asvd", "svd_llm"])
def test_randomized_svd_option_is_close_to_exact(method, layer1):
    name = "self_attn.q_proj"
    linear, stats = layer1.linears[name], layer1.stats[name]
    G = stats.inputs.gram()
    errors = {}
    for svd in ("exact", "randomized"):
        Wk = step_for(method, 0.3, svd=svd).apply(name, linear, stats).dense_weight().detach()
        dW = linear.weight.detach().double() - Wk.double()
        errors[svd] = float(torch.einsum("ij,jk,ik->", dW, G, dW))
    assert errors["randomized"] == pytest.approx(errors["exact"], rel=0.05)


def test_a_factored_linear_target_is_compressed_from_its_dense_weight(layer1):
    linear = layer1.linears["self_attn.k_proj"]
    wrapped = FactoredLinear.from_linear(with_bias(linear))
    a = step_for("svd", 0.5).apply("k", wrapped, None)
    b = step_for("svd", 0.5).apply("k", with_bias(linear), None)
    torch.testing.assert_close(a.dense_weight(), b.dense_weight())
    torch.testing.assert_close(a.bias, b.bias)
