"""Method-specific claims of LoLDU, LoRA-SB, ALLoRA, LoRA-GGPO and BA-LoRA on real SmolLM2
layers (copies of layer-0 projections fed their real input), a 3-block SmolLM2, the whole model
for LoRA-SB's gradient, and the training loop for the methods whose hooks act while training.

LoLDU: P·L·diag(D)·Û reconstructs W, the adapter holds the first r components, only the r
diagonal entries train. LoRA-SB: the initial B·R·A is the best rank-r approximation of the first
full fine-tuning update (Eckart-Young), B and A orthonormal and frozen, the start exact. ALLoRA:
the gradients after its hook are the formula's. GGPO: training forwards see exactly x·εᵀ on top,
with ε sized by the formula, drawn again in backward; evaluation, the saved adapter and reloads
never see it. BA-LoRA: the regularisers equal their formulas (zero or extreme where expected); the
pre-trained pass equals the original model. In the loop: a run interrupted and resumed equals the
uninterrupted one, and the final evaluation equals that of the saved adapter reloaded.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import slimtune.adapt as adapt
from slimtune.adapt.api import before_step
from slimtune.adapt.ba_lora import regularisers
from slimtune.adapt.ggpo import Perturbation, noise
from slimtune.adapt.loldu import ldu
from slimtune.adapt.registry import make_config
from slimtune.targets import factored_layers
from slimtune.train import make_train_config, train
from real_layers import first_blocks, layer0_copies as layers
from test_adapt_svd_methods import block0, rel, x  # noqa: F401  (fixtures: layer 0, its input)
from test_train import CrashAt, lm_task  # noqa: F401  (lm_task: a fixture)

R = 8
NAMES = ["q_proj", "v_proj", "gate_proj"]


def apply(model, method, **params):
    return adapt.apply(model, method, r=R, targets=NAMES, progress=False, **params)


def mse(model, x, wanted):
    return sum((model[n](x) - wanted[n]).square().mean() for n in NAMES)


@pytest.fixture(scope="module")
def wanted(block0, x):
    """Regression targets: the original layers' outputs on ``x`` plus a fixed perturbation."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return {n: m(x) + 0.1 * torch.randn(m(x).shape, generator=g)
                for n, m in layers(block0).items()}


@torch.no_grad()
def randomise(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in adapt.trainable_parameters(model).values():
        p.add_(torch.randn(p.shape, generator=g) * scale)


# -- LoLDU ---------------------------------------------------------------------------------------
def test_loldu_ldu_reconstructs_w_and_only_the_diagonal_trains(block0, x, wanted):
    original = layers(block0)
    model = apply(layers(block0), "loldu")
    for name, layer in factored_layers(model).items():
        W = original[name].weight.detach()
        P64, L64, D64, U64 = ldu(W.double())
        assert rel(P64 @ L64 @ torch.diag(D64) @ U64, W) < 1e-12
        k = min(W.shape)
        assert torch.equal(torch.diagonal(L64), torch.ones(k, dtype=torch.float64))
        assert not L64.triu(1).any() and not U64.tril(-1).any()
        assert torch.allclose(torch.diagonal(U64), torch.ones(k, dtype=torch.float64))
        P, L, D, U = ldu(W)
        lr = layer.lowrank
        assert torch.equal(lr.B, P @ L[:, :R]) and torch.equal(lr.A, U[:R])
        assert torch.equal(lr.core, D[:R]) and lr.scale == 1 / R
        own = {k for k, p in layer.named_parameters() if p.requires_grad}
        assert own == {"lowrank.core"} and lr.core.numel() == R  # LoRA trains R·(in + out)
        assert rel(layer.base.weight + layer.origin.delta_weight(), W) < 1e-6
        assert rel(layer(x), original[name](x)) < 1e-6
    frozen = {k: v.clone() for k, v in model.state_dict().items()
              if not k.endswith("lowrank.core")}
    cores = {n: layer.lowrank.core.detach().clone() for n, layer in factored_layers(model).items()}
    opt = torch.optim.AdamW(adapt.trainable_parameters(model).values(), lr=1e-2, weight_decay=0)
    mse(model, x, wanted).backward()
    opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    for name, layer in factored_layers(model).items():
        assert not torch.equal(layer.lowrank.core, cores[name])
        assert rel(layer(x), original[name](x)) > 1e-4


# -- LoRA-SB -------------------------------------------------------------------------------------
LAYER0 = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


@pytest.fixture(scope="module")
def windows(smollm2):
    from slimtune.calib import calibration_windows

    return calibration_windows(smollm2[1], "ptb", "train", n=2, seqlen=32, seed=0)


def reference_gradients(model, windows) -> dict[str, torch.Tensor]:
    """∇W of the mean next-token loss over the windows (Hugging Face's own loss), per target."""
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    for n in LAYER0:
        model.get_submodule(n).weight.requires_grad_(True)
    for w in windows:
        (model(w[None], labels=w[None]).loss / len(windows)).backward()
    return {n: model.get_submodule(n).weight.grad.double() for n in LAYER0}


@pytest.mark.parametrize("batch_size", [1, 2])
def test_lora_sb_product_is_the_best_rank_r_approximation_of_the_first_update(
        smollm2, windows, batch_size, ptb_test_ids):
    base = smollm2[0]
    model = adapt.apply(copy.deepcopy(base), "lora_sb", r=R, targets=LAYER0, calib=windows,
                        update="gradient", svd="exact", batch_size=batch_size, progress=False)
    grads = reference_gradients(base, windows)
    for name, layer in factored_layers(model).items():
        update = -1e-2 * grads[name]
        S = torch.linalg.svdvals(update)
        product = layer.lowrank.delta_weight().detach().double()
        # Eckart-Young: no rank-r matrix is closer than the discarded singular values
        assert float((update - product).square().sum()) == pytest.approx(
            float(S[R:].square().sum()), rel=1e-4)
        assert torch.allclose(torch.linalg.svdvals(product)[:R], S[:R], rtol=1e-4)
        lr = layer.lowrank
        assert lr.scale == 1.0 and torch.equal(lr.core, torch.diag(torch.diagonal(lr.core)))
        assert {k for k, p in layer.named_parameters() if p.requires_grad} == {"lowrank.core"}
        eye = torch.eye(R, dtype=torch.float64)
        assert torch.allclose(lr.B.double().mT @ lr.B.double(), eye, atol=1e-5)
        assert torch.allclose(lr.A.double() @ lr.A.double().mT, eye, atol=1e-5)
    ids = ptb_test_ids[:24][None]
    with torch.no_grad():
        assert rel(model(ids).logits, base(ids).logits) < 1e-5


def test_lora_sb_sign_update_and_the_reference_start(smollm2, windows, ptb_test_ids):
    """Default: the update is -lr·sign(G) (Adam's first step); ``start: update`` starts at
    W + B·R·A on the unchanged weight, as the reference code."""
    base = smollm2[0]
    grads = reference_gradients(base, windows)
    model = adapt.apply(copy.deepcopy(base), "lora_sb", r=R, targets=LAYER0, calib=windows,
                        svd="exact", start="update", progress=False)
    assert not adapt.adapter_config(model).exact_start
    for name, layer in factored_layers(model).items():
        U, S, Vh = torch.linalg.svd(-1e-2 * grads[name].sign(), full_matrices=False)
        best = (U[:, :R] * S[:R]) @ Vh[:R]
        assert rel(layer.lowrank.delta_weight(), best) < 1e-3  # room for a flip of a ~0 sign
        assert layer.origin is None
        assert torch.equal(layer.base.weight, base.get_submodule(name).weight)
    ids = ptb_test_ids[:24][None]
    with torch.no_grad():
        assert rel(model(ids).logits, base(ids).logits) > 1e-4


def test_lora_sb_layer_the_output_ignores_starts_from_its_weight(minilm):
    """Under a mean-pooling head BERT's pooler gets no gradient: its factors are W's top-r
    singular pairs with R₀ = 0 (exact start); the used layers get their first update."""
    encoder, tok = minilm

    class MeanPooled(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids):
            return self.encoder(input_ids).last_hidden_state.mean(1)

    model = MeanPooled(copy.deepcopy(encoder)).eval()
    ids = torch.tensor([tok("Sparse and low-rank updates of a pretrained encoder.")["input_ids"]])
    with torch.no_grad():
        expected = model(ids)
    adapt.apply(model, "lora_sb", r=R, targets=["dense"], calib=ids, svd="exact",
                progress=False)
    layers = factored_layers(model)
    pooler = layers["encoder.pooler.dense"]
    assert float(pooler.lowrank.core.abs().max()) == 0
    U, S, Vh = torch.linalg.svd(encoder.pooler.dense.weight.double(), full_matrices=False)
    B = pooler.lowrank.B.double()  # W's top-r left singular subspace
    assert rel(U[:, :R] @ (U[:, :R].T @ B), B) < 1e-4
    assert float(layers["encoder.encoder.layer.0.attention.output.dense"].lowrank.core.abs()
                 .max()) > 0
    with torch.no_grad():
        assert rel(model(ids), expected) < 1e-5


# -- ALLoRA --------------------------------------------------------------------------------------
def test_allora_gradients_after_its_hook_equal_the_formula(block0, x, wanted):
    eta = 10.0
    model = apply(layers(block0), "allora", eta=eta)
    with torch.no_grad():  # half of B's rows trained a little, half still at zero
        for layer in factored_layers(model).values():
            B = layer.lowrank.B
            B[: B.shape[0] // 2] = 0.01 * torch.randn(B.shape[0] // 2, R)
    mse(model, x, wanted).backward()
    raw = {k: p.grad.clone() for k, p in adapt.trainable_parameters(model).items()}
    adapt.after_backward(model, 0)
    for name, layer in factored_layers(model).items():
        assert layer.lowrank.scale == 1.0
        for key in ("A", "B"):
            theta = getattr(layer.lowrank, key)
            norm2 = theta.detach().double().square().sum(dim=1, keepdim=True)
            expected = raw[f"{name}.lowrank.{key}"].double() / torch.sqrt(norm2 + 1 / eta ** 2)
            torch.testing.assert_close(theta.grad.double(), expected, rtol=1e-6, atol=0)
        B = layer.lowrank.B
        zero = B.shape[0] // 2
        torch.testing.assert_close(B.grad[zero:], eta * raw[f"{name}.lowrank.B"][zero:])


# -- LoRA-GGPO -----------------------------------------------------------------------------------
def expected_sigma(layer, rho, beta, share=None):
    W = layer.combined_weight().detach().double()
    rows = W.norm(dim=1)
    share = torch.full_like(rows, W.shape[0] ** -0.5) if share is None else share.double()
    return rho / math.sqrt(W.shape[1]) * ((1 - beta) * rows + beta * share * W.norm())


def test_ggpo_perturbs_training_forwards_only(block0, x, wanted, tmp_path):
    rho, beta = 0.05, 0.5
    model = apply(layers(block0), "ggpo", rho=rho, grad_weight=beta, ramp=False)
    randomise(model)
    with torch.no_grad():
        clean = {n: model[n](x) for n in NAMES}
    before_step(model, 3)
    for name, layer in factored_layers(model).items():
        sigma, seed, tag = layer.ggpo_sigma
        assert tag == f"{name}/ggpo/3"
        torch.testing.assert_close(sigma.double(), expected_sigma(layer, rho, beta), rtol=1e-5,
                                   atol=0)
        eps = noise(sigma, layer.in_features, seed, tag)
        assert float((eps / sigma[:, None]).std()) == pytest.approx(1.0, abs=0.01)
        torch.testing.assert_close(model[name](x) - clean[name], x @ eps.mT, rtol=1e-4,
                                   atol=1e-5)
        with torch.no_grad():  # evaluation: no perturbation
            assert torch.equal(model[name](x), clean[name])
    path = adapt.save(model, tmp_path / "adapter")  # mid-step: the adapter holds no ε
    saved = load_file(path / "adapter.safetensors")
    assert all(k.split(".", 1)[1] in ("lowrank.A", "lowrank.B") for k in saved)
    loaded = adapt.load(layers(block0), path)
    for name in NAMES:
        torch.testing.assert_close(loaded[name](x), clean[name], rtol=0, atol=0)
    mse(model, x, wanted).backward()
    adapt.after_backward(model, 3)
    state = adapt.method_state(model)
    before_step(model, 4)  # the next step's σ follows the rows' gradient norms
    for name, layer in factored_layers(model).items():
        g = layer.lowrank.B.grad.norm(dim=1)
        torch.testing.assert_close(state[f"grad_norm/{name}"], g)
        share = g / g.norm()
        torch.testing.assert_close(layer.ggpo_sigma[0].double(),
                                   expected_sigma(layer, rho, beta, share), rtol=1e-5, atol=0)
    adapt.after_backward(model, 4)
    for name in NAMES:
        assert torch.equal(model[name](x), clean[name])  # cleared: gradients or not


def test_ggpo_noise_is_drawn_again_in_backward(block0, x):
    sigma = torch.rand(192) * 0.01
    h = x.clone().requires_grad_(True)
    out = Perturbation.apply(h, sigma, 7, "v_proj/ggpo/1")
    g = torch.randn(out.shape)
    out.backward(g)
    eps = noise(sigma, x.shape[-1], 7, "v_proj/ggpo/1")
    torch.testing.assert_close(out, x @ eps.mT)
    torch.testing.assert_close(h.grad, g @ eps)


# -- BA-LoRA -------------------------------------------------------------------------------------
def test_ba_lora_regularisers_equal_their_formulas():
    g = torch.Generator().manual_seed(0)
    y, y0 = (torch.randn(2, 4, 6, generator=g, dtype=torch.float64) for _ in range(2))
    terms = regularisers(y, y0, k=2)
    p, p0 = y.softmax(-1), y0.softmax(-1)
    kl = sum(float((p0[b, t] * (p0[b, t].log() - p[b, t].log())).sum())
             for b in range(2) for t in range(4)) / 2
    entropy = [-float((p[b, t] * p[b, t].log()).sum()) for b in range(2) for t in range(4)]
    ratios = [float(torch.linalg.svd(y[b]).S[:2].sum() / torch.linalg.svd(y[b]).S.sum())
              for b in range(2)]
    assert float(terms["consistency"]) == pytest.approx(kl, rel=1e-12)
    assert float(terms["diversity"]) == pytest.approx(-sum(entropy) / 8, rel=1e-12)
    assert float(terms["svd"]) == pytest.approx(-sum(ratios) / 2, rel=1e-9)

    c, c0 = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    terms = regularisers(c, c0, k=1)
    unit = lambda t: t / t.norm(dim=1, keepdim=True)  # noqa: E731
    cov = torch.cov(c.mT)
    S = torch.linalg.svd(c).S
    assert float(terms["consistency"]) == pytest.approx(float((unit(c) - unit(c0)).square()
                                                              .mean()), rel=1e-12)
    assert float(terms["diversity"]) == pytest.approx(
        float((cov - torch.diag(torch.diag(cov))).square().sum() / 3), rel=1e-12)
    assert float(terms["svd"]) == pytest.approx(-float(S[0] / S.sum()), rel=1e-9)

    assert float(regularisers(y, y, 2)["consistency"]) == pytest.approx(0, abs=1e-15)
    assert float(regularisers(c, c, 1)["consistency"]) == 0
    assert float(regularisers(c[:1], c0[:1], 1)["diversity"]) == 0  # one example: no covariance
    rank_one = torch.outer(torch.arange(1.0, 6.0), torch.tensor([1.0, -2.0, 0.5]))
    assert float(regularisers(rank_one, c0.float(), 1)["svd"]) == pytest.approx(-1, abs=1e-6)
    flat = torch.zeros(2, 4, 6)  # uniform predictions: the largest entropy
    assert float(regularisers(flat, flat, 1)["diversity"]) == pytest.approx(-math.log(6))


@pytest.fixture(scope="module")
def three_blocks(smollm2):
    return first_blocks(smollm2[0], 3)


def test_ba_lora_pretrained_pass_and_loss_term(three_blocks, ptb_test_ids):
    ids = ptb_test_ids[:48].view(2, 24)
    with torch.no_grad():
        original = three_blocks(ids).logits
    model = adapt.apply(copy.deepcopy(three_blocks), "ba_lora", r=R, targets=["q_proj", "v_proj"],
                        svd="exact", progress=False)
    randomise(model, scale=0.02)
    with torch.no_grad():
        assert model(ids).logits is not None and "ba_lora_outputs" not in model.__dict__
    before_step(model, 0)
    model.train()
    y = model(ids).logits
    captured, y0 = model.__dict__["ba_lora_outputs"]
    assert captured is y and not y0.requires_grad and model.training
    assert rel(y0, original) < 1e-5 and rel(y, original) > 1e-3
    config = adapt.adapter_config(model)
    terms = {k: float(v) for k, v in regularisers(y.detach(), y0, config.k).items()}
    expected = 1e-4 * terms["consistency"] + 3e-4 * terms["diversity"] + 1e-4 * terms["svd"]
    extra = adapt.extra_loss(model)
    assert float(extra.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(terms["consistency"]) > 0 and adapt.extra_loss(model) is None  # consumed
    extra.backward()
    grads = [p.grad for p in adapt.trainable_parameters(model).values()]
    assert all(bool(torch.isfinite(g).all()) for g in grads) and any(g.any() for g in grads)


# -- in the training loop: hooks while training, exact resume, clean evaluation ----------------
LAST_BLOCKS = r"model\.layers\.(28|29)\.self_attn\.(q|v)_proj"


@pytest.mark.parametrize("method,params", [("ggpo", {"rho": 0.5}), ("ba_lora", {}),
                                           ("allora", {})])
def test_training_resumes_exactly_and_evaluates_clean(smollm2, lm_task, tmp_path, method,
                                                      params):
    base = smollm2[0]
    config = make_train_config(data="austen", steps=4, batch=2, seqlen=32, eval_tokens=64,
                               lr=1e-3, warmup=1, save_every=2)
    adapter = make_config(method, r=4, targets=LAST_BLOCKS, **params)
    _, full = train(copy.deepcopy(base), lm_task(), config, tmp_path / "full", adapter=adapter,
                    progress=False)
    with pytest.raises(KeyboardInterrupt):  # dies in step 3, after the checkpoint of step 2
        train(copy.deepcopy(base), CrashAt(lm_task(), 3), config, tmp_path / "cut",
              adapter=adapter, progress=False)
    _, resumed = train(copy.deepcopy(base), lm_task(), config, tmp_path / "cut", adapter=adapter,
                       resume=True, progress=False)
    assert resumed["resumed_at"] == [2]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in resumed["steps"]] == pytest.approx(
            [r[key] for r in full["steps"]], rel=1e-5)
    if method == "ba_lora":
        assert all(r["extra_loss"] < 0 for r in full["steps"])  # -entropy dominates
    a = load_file(tmp_path / "full" / "adapter.safetensors")
    b = load_file(tmp_path / "cut" / "adapter.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    reloaded = adapt.load(copy.deepcopy(base), tmp_path / "full")
    assert lm_task().evaluate(reloaded)["perplexity"] == pytest.approx(
        full["final_eval"]["perplexity"], rel=1e-6)
    if method == "ggpo":  # the perturbation changed the training
        plain = make_config(method, r=4, targets=LAST_BLOCKS, rho=0.0)
        _, lora = train(copy.deepcopy(base), lm_task(), config, tmp_path / "plain",
                        adapter=plain, progress=False)
        assert lora["steps"][0]["loss"] == full["steps"][0]["loss"]  # f(0) = 0: no ε yet
        assert lora["steps"][-1]["loss"] != pytest.approx(full["steps"][-1]["loss"], rel=1e-4)
