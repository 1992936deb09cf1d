"""Method-specific claims of DoRA, MiLoRA, OLoRA, SVFit and SORSA on real SmolLM2 layers
(copies of layer-0 projections, inputs = the layer's real normalised embeddings); PEFT is the
reference where it implements the method (OLoRA's init, DoRA's forward)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimtune.adapt as adapt
from slimtune.adapt.registry import make_config
from slimtune.targets import factored_layers

R = 8


def init(method: str, linear: nn.Linear, **params):
    config = make_config(method, r=R, **params)
    return adapt.get_method(method).hook("init_layer")("layer", linear, config, None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def block0(smollm2):
    return smollm2[0].model.layers[0]


@pytest.fixture(scope="module")
def x(smollm2, ptb_test_ids, block0):
    """The real input of layer 0's attention projections on 24 PTB tokens."""
    with torch.no_grad():
        return block0.input_layernorm(smollm2[0].model.embed_tokens(ptb_test_ids[:24][None]))


@pytest.fixture
def q_proj(block0):
    return copy.deepcopy(block0.self_attn.q_proj)


@pytest.fixture
def two_layers(block0):
    """A container with copies of q_proj and v_proj, to ``apply`` a method to."""
    return nn.ModuleDict({"q_proj": copy.deepcopy(block0.self_attn.q_proj),
                          "v_proj": copy.deepcopy(block0.self_attn.v_proj)})


def peft_wrap(linear: nn.Linear, **lora_kw):
    from peft import LoraConfig, get_peft_model

    holder = nn.Sequential(copy.deepcopy(linear))
    model = get_peft_model(holder, LoraConfig(r=R, target_modules=["0"], **lora_kw))
    return model, model.base_model.model[0]


# -- PiSSA's SVD routes ----------------------------------------------------------------------------
@pytest.mark.parametrize("svd", ["exact", "gram"])
@pytest.mark.parametrize("proj", ["self_attn.q_proj", "mlp.down_proj"])
def test_pissa_principal_part_is_the_rank_r_truncation(block0, svd, proj):
    """Both exact routes put the float64 rank-r truncation of the real weight in the adapter
    (the gram route: eigh of the float64 Gram matrix; tolerance covers float32 storage)."""
    linear = copy.deepcopy(block0.get_submodule(proj))
    W = linear.weight.detach().double()
    layer = init("pissa", linear, svd=svd)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    W_r = (U[:, :R] * S[:R]) @ Vh[:R]
    assert rel(layer.lowrank.delta_weight(), W_r) < (1e-5 if svd == "gram" else 1e-3)
    assert rel(layer.combined_weight(), W) < 1e-6


# -- MiLoRA ------------------------------------------------------------------------------------
def test_milora_factors_span_the_minor_singular_subspace(q_proj):
    linear = q_proj.double()
    W = linear.weight.detach().clone()
    layer = init("milora", linear, alpha=16.0)
    A, B, s = layer.lowrank.A.detach(), layer.lowrank.B.detach(), layer.lowrank.scale
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U_min, V_min = U[:, -R:], Vh[-R:].mT
    assert float((B - U_min @ (U_min.mT @ B)).norm() / B.norm()) < 1e-8
    assert float((A.mT - V_min @ (V_min.mT @ A.mT)).norm() / A.norm()) < 1e-8
    # the adapter holds exactly the r smallest singular values, and base + adapter = W
    assert torch.allclose(torch.linalg.svdvals(s * B @ A)[:R], S[-R:], rtol=1e-8)
    assert rel(layer.base.weight + s * B @ A, W) < 1e-12
    assert float(S[-R:].max()) < 0.2 * float(S[:R].min())  # minor really is small here


@pytest.mark.parametrize("method", ["milora", "olora", "svfit", "sorsa"])
def test_factorising_methods_reject_r_beyond_the_layer(method, q_proj):
    with pytest.raises(ValueError, match="r=600"):
        adapt.get_method(method).hook("init_layer")("layer", q_proj, make_config(method, r=600), None)


# -- OLoRA -------------------------------------------------------------------------------------
def test_olora_B_is_orthonormal_and_A_is_the_top_of_R(q_proj):
    W = q_proj.weight.detach().clone()
    layer = init("olora", q_proj)
    A, B, s = layer.lowrank.A.detach(), layer.lowrank.B.detach(), layer.lowrank.scale
    assert torch.allclose(B.mT @ B, torch.eye(R), atol=1e-5)
    assert torch.equal(A[:, :R], A[:, :R].triu())  # rows of an upper-triangular R
    # B·A is the rank-r part of the QR: projecting W on B's columns gives the same rows
    assert rel(B @ A, B @ (B.mT @ W)) < 1e-5
    assert rel(layer.base.weight + s * B @ A, W) < 1e-6


def test_olora_matches_peft_init(q_proj):
    _, peft_layer = peft_wrap(q_proj, lora_alpha=16, init_lora_weights="olora")
    layer = init("olora", q_proj, alpha=16.0)
    torch.testing.assert_close(layer.lowrank.A, peft_layer.lora_A["default"].weight)
    torch.testing.assert_close(layer.lowrank.B, peft_layer.lora_B["default"].weight)
    torch.testing.assert_close(layer.base.weight, peft_layer.base_layer.weight)


# -- SVFit -------------------------------------------------------------------------------------
def test_svfit_trains_only_r_singular_values_per_layer(two_layers, x):
    weights = {n: m.weight.detach().clone() for n, m in two_layers.items()}
    adapt.apply(two_layers, "svfit", r=R, svd="exact", progress=False)
    params = adapt.trainable_parameters(two_layers)
    assert sorted(params) == ["q_proj.lowrank.core", "v_proj.lowrank.core"]
    assert all(p.shape == (R,) for p in params.values())
    for name, layer in factored_layers(two_layers).items():
        lr = layer.lowrank
        assert torch.allclose(lr.core, torch.linalg.svdvals(weights[name])[:R], rtol=1e-5)
        assert torch.allclose(lr.B.mT @ lr.B, torch.eye(R), atol=1e-5)
        assert torch.allclose(lr.A @ lr.A.mT, torch.eye(R), atol=1e-5)
        assert lr.scale == 1.0
        assert rel(layer.combined_weight(), weights[name]) < 1e-6
    # a gradient step reaches the singular values and nothing else
    sum(m(x).square().mean() for m in two_layers.values()).backward()
    grads = {k: p.grad for k, p in two_layers.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(params) and all(bool(g.abs().max() > 0) for g in grads.values())


def test_svfit_ignores_alpha(q_proj, x):
    a = init("svfit", copy.deepcopy(q_proj), alpha=1.0)
    b = init("svfit", copy.deepcopy(q_proj), alpha=64.0, rslora=True)
    with torch.no_grad():
        a.lowrank.core.mul_(1.5)
        b.lowrank.core.mul_(1.5)
    torch.testing.assert_close(a(x), b(x))


# -- SORSA -------------------------------------------------------------------------------------
def orthonormal_error(M: torch.Tensor) -> torch.Tensor:
    M = M.detach().double()
    return (M.mT @ M - torch.eye(M.shape[1], dtype=M.dtype)).square().sum()


def test_sorsa_regulariser_is_zero_at_init_and_grows_off_orthonormal(two_layers):
    adapt.apply(two_layers, "sorsa", r=R, progress=False)
    gamma = adapt.adapter_config(two_layers).gamma
    assert gamma == 4e-4
    start = adapt.extra_loss(two_layers)
    assert start.ndim == 0 and float(start) < 1e-10
    layer = two_layers["q_proj"]
    with torch.no_grad():
        layer.lowrank.B.add_(0.05 * torch.randn(layer.lowrank.B.shape,
                                                generator=torch.Generator().manual_seed(0)))
    expected = gamma * sum(orthonormal_error(m.lowrank.B) + orthonormal_error(m.lowrank.A.mT)
                           for m in factored_layers(two_layers).values())
    grown = adapt.extra_loss(two_layers)
    assert float(grown) > 1e3 * float(start) and float(grown) > 1e-6
    assert abs(float(grown) - float(expected)) < 1e-4 * float(expected)


def test_sorsa_regulariser_gradient_reaches_the_singular_vectors(two_layers):
    adapt.apply(two_layers, "sorsa", r=R, gamma=0.1, progress=False)
    layer = two_layers["v_proj"]
    with torch.no_grad():  # move off the orthonormal point, where the gradient is zero
        layer.lowrank.A.mul_(1.1)
        two_layers["q_proj"].lowrank.B.mul_(0.9)
    adapt.extra_loss(two_layers).backward()
    assert bool(layer.lowrank.A.grad.abs().max() > 0)
    assert bool(two_layers["q_proj"].lowrank.B.grad.abs().max() > 0)
    assert layer.lowrank.core.grad is None  # the singular values are not regularised
    # gradient descent on the regulariser restores orthonormality
    before = orthonormal_error(layer.lowrank.A.mT)
    with torch.no_grad():
        layer.lowrank.A.sub_(0.01 * layer.lowrank.A.grad)
    assert float(orthonormal_error(layer.lowrank.A.mT)) < float(before)


def test_sorsa_gamma_is_validated():
    with pytest.raises(ValueError, match="gamma"):
        make_config("sorsa", gamma=-1.0)


# -- DoRA --------------------------------------------------------------------------------------
def test_dora_magnitude_is_the_row_norm_at_init(q_proj, x):
    layer = init("dora", q_proj)
    row_norms = torch.linalg.vector_norm(q_proj.weight, dim=1)
    assert torch.equal(layer.transform.magnitude, row_norms)
    assert torch.equal(layer.transform.output_scale(layer), torch.ones_like(row_norms))
    assert torch.equal(layer(x), q_proj(x))


def trained_dora(q_proj):
    layer = init("dora", q_proj, alpha=16.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lowrank.B.add_(0.01 * torch.randn(layer.lowrank.B.shape, generator=g))
        layer.transform.magnitude.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=g))
    return layer


def test_dora_merge_folds_the_magnitude(q_proj, x):
    layer = trained_dora(q_proj)
    m = layer.transform.magnitude.detach().clone()
    direction = layer.combined_weight().detach()
    trained = layer(x)
    assert rel(trained, q_proj(x)) > 1e-2
    layer.merge()
    merged_weight = layer.dense_weight()
    # the merged weight is m ⊙ V / ||V||_row: its row norms are the magnitude
    assert rel(torch.linalg.vector_norm(merged_weight, dim=1), m) < 1e-5
    assert rel(merged_weight, m[:, None] * direction / direction.norm(dim=1, keepdim=True)) < 1e-5
    assert rel(layer(x), trained) < 1e-5
    layer.unmerge()
    assert rel(layer(x), trained) < 1e-5


def test_dora_forward_matches_peft(q_proj, x):
    layer = trained_dora(q_proj)
    peft_model, peft_layer = peft_wrap(q_proj, lora_alpha=16, use_dora=True)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.lowrank.A)
        peft_layer.lora_B["default"].weight.copy_(layer.lowrank.B)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.transform.magnitude)
        assert rel(layer(x), peft_model(x)) < 1e-5
