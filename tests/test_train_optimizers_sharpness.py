"""The optimisers that wrap a base optimiser and take extra gradients per step (GAM, FSAM; SAM's
own test is in test_train_optimizers.py) on SmolLM2's first MLP: each equals its paper's update
written out here with a plain torch AdamW; FSAM perturbs only its Fisher mask, which resumes
exactly; no wrapper can be another's base; a resumed wrapper's lr schedule still reaches the
base."""
import copy

import pytest
import torch
from torch.nn.functional import mse_loss

from slimtune.registry import ConfigError
from slimtune.train.optimizers import OPTIMIZERS, build
from slimtune.train.optimizers.config import OptimizerConfig
from test_train_optimizers import batch, block_mlp, run  # noqa: F401 (block_mlp: fixture)

WRAPPERS = ["sam", "asam", "gam", "fsam"]
XI = 1e-12


def flat_norm(tensors):
    return torch.cat([t.flatten() for t in tensors]).norm()


def grad_at(model, params, point, x, y):
    """∇L at the parameters ``point`` (the model is left there)."""
    with torch.no_grad():
        for p, v in zip(params, point):
            p.copy_(v)
    return torch.autograd.grad(mse_loss(model(x), y), params)


def compare(ours_model, ref_model):
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_gam_is_algorithm_2_of_the_paper(block_mlp):
    """GAM's Algorithm 2 (accelerated GAM) written out from the box: four gradients of the batch
    (at θ, θ + ρ′ĝ₀, θ₂ = θ + ρĥ₀, θ₂ + ρ′ĝ₂), h₊ = αg₁ + (1 − α)g₃, h₋ = βg₀ + (1 − β)g₂, and
    AdamW steps from θ with h₊ − γ·h₋⊥; 3 steps, the same parameters within 1e-5 relative. In
    float64: h₀ = g₁ − g₀ cancels (‖h₀‖ ≈ ‖g₀‖/150 here) and ρ = 0.2 along it amplifies float32
    rounding to ~5e-6 of the direction, which AdamW's first (sign-like) step turns into visible
    differences on the entries where it is near zero."""
    keys = {"rho": 0.2, "rho_prime": 0.02, "alpha": 0.6, "beta": 0.3, "gamma": 0.5}
    ours_model, ref_model = copy.deepcopy(block_mlp).double(), copy.deepcopy(block_mlp).double()
    ours = build("gam", ours_model, lr=1e-3, **keys)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, weight_decay=0.0)
    run(ours_model, ours, 3)
    params = list(ref_model.parameters())
    rho, rho_p, alpha, beta, gamma = keys.values()
    for step in range(3):
        x, y = (t.double() for t in batch(step))
        theta = [p.detach().clone() for p in params]
        g0 = grad_at(ref_model, params, theta, x, y)
        n0 = flat_norm(g0)
        g1 = grad_at(ref_model, params, [t + rho_p * g / (n0 + XI) for t, g in zip(theta, g0)],
                     x, y)
        h0 = [a - b for a, b in zip(g1, g0)]
        n_h = flat_norm(h0)
        theta2 = [t + rho * h / (n_h + XI) for t, h in zip(theta, h0)]
        g2 = grad_at(ref_model, params, theta2, x, y)
        n2 = flat_norm(g2)
        g3 = grad_at(ref_model, params, [t + rho_p * g / (n2 + XI) for t, g in zip(theta2, g2)],
                     x, y)
        h_plus = [alpha * a + (1 - alpha) * b for a, b in zip(g1, g3)]
        h_minus = [beta * a + (1 - beta) * b for a, b in zip(g0, g2)]
        hp, hm = (torch.cat([t.flatten() for t in h]) for h in (h_plus, h_minus))
        coef = hm.dot(hp) / hp.dot(hp)
        with torch.no_grad():
            for p, t, a, b in zip(params, theta, h_plus, h_minus):
                p.copy_(t)
                p.grad = a - gamma * (b - coef * a)
        ref.step()
        ref.zero_grad(set_to_none=True)
    compare(ours_model, ref_model)
    with pytest.raises(ValueError, match="four gradients per step"):
        ours.step()


def fsam_reference(model, steps, rho, sparsity, interval, lr=1e-3):
    """FSAM written out: every ``interval`` steps the mask keeps the round((1 − s)·d) entries of
    largest g² over all parameters; ε = ρ·g/‖g‖ on the mask (0 elsewhere); AdamW steps from w
    with ∇L(w + ε). Returns the last masks."""
    params = list(model.parameters())
    adamw = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    masks = None
    for step in range(steps):
        x, y = (t.to(params[0].dtype) for t in batch(step))
        w = [p.detach().clone() for p in params]
        g = grad_at(model, params, w, x, y)
        if step % interval == 0:
            fisher = torch.cat([t.flatten() ** 2 for t in g])
            keep = round(fisher.numel() * (1 - sparsity))
            threshold = fisher.topk(keep).values.min()
            masks = [t ** 2 >= threshold for t in g]
            assert sum(int(m.sum()) for m in masks) == keep  # no ties at the threshold
        norm = flat_norm(g)
        eps = [torch.where(m, rho * t / (norm + XI), 0.0) for t, m in zip(g, masks)]
        second = grad_at(model, params, [a + e for a, e in zip(w, eps)], x, y)
        with torch.no_grad():
            for p, a, s in zip(params, w, second):
                p.copy_(a)
                p.grad = s
        adamw.step()
        adamw.zero_grad(set_to_none=True)
    return masks


def test_fsam_is_the_masked_two_step_update_of_the_paper(block_mlp):
    """FSAM with sparsity 0.9 and the mask refreshed every 2 steps (at steps 0 and 2), 4 steps:
    the same parameters within 1e-5 relative, and the same masks, as written out above. In
    float64: in float32 the two runs' ulp-level differences flip entries at the mask's edge."""
    ours_model, ref_model = copy.deepcopy(block_mlp).double(), copy.deepcopy(block_mlp).double()
    ours = build("fsam", ours_model, lr=1e-3, rho=0.05, sparsity=0.9, mask_interval=2)
    run(ours_model, ours, 4)
    masks = fsam_reference(ref_model, 4, 0.05, 0.9, 2)
    compare(ours_model, ref_model)
    for p, m in zip(ours_model.parameters(), masks):
        assert torch.equal(ours.state[p]["fisher_mask"], m)
    with pytest.raises(ValueError, match="two gradients per step"):
        ours.step()


def test_fsam_moves_only_the_masked_entries(block_mlp):
    """At the second gradient, the parameters outside the Fisher mask are exactly unmoved and
    those in it moved; the mask holds 10% of all entries (sparsity 0.9), and its entries have
    larger g² than any outside it."""
    model = copy.deepcopy(block_mlp)
    opt = build("fsam", model, lr=1e-3)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    x, y = batch(0)
    mse_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in params]
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in params])
        opt.zero_grad(set_to_none=True)
        loss = mse_loss(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    masks = [opt.state[p]["fisher_mask"] for p in params]
    total = sum(p.numel() for p in params)
    assert sum(int(m.sum()) for m in masks) == round(0.1 * total)
    inside = torch.cat([(g ** 2)[m] for g, m in zip(grads, masks)])
    outside = torch.cat([(g ** 2)[~m] for g, m in zip(grads, masks)])
    assert inside.min() >= outside.max()
    (moved,) = seen
    for b, a, m in zip(before, moved, masks):
        assert torch.equal(a[~m], b[~m])
    assert all(bool((a[m] != b[m]).float().mean() > 0.99) for b, a, m in zip(before, moved, masks)
               if m.any())


def test_fsam_resumes_its_mask_exactly(block_mlp):
    """Refreshing every 3 steps: 2 steps, save, resume, 3 more (a refresh at step 3) equals 5
    unbroken steps; the state dict holds the masks and the step count beside AdamW's."""
    keys = {"lr": 1e-3, "mask_interval": 3, "sparsity": 0.5}
    straight = copy.deepcopy(block_mlp)
    run(straight, build("fsam", straight, **keys), 5)
    first = copy.deepcopy(block_mlp)
    opt = build("fsam", first, **keys)
    run(first, opt, 2)
    saved = copy.deepcopy((first.state_dict(), opt.state_dict()))
    assert saved[1]["fsam"]["steps"] == 2 and len(saved[1]["fsam"]["masks"]) == 5
    assert all(m.dtype == torch.bool for m in saved[1]["fsam"]["masks"].values())
    resumed = copy.deepcopy(block_mlp)
    resumed.load_state_dict(saved[0])
    opt = build("fsam", resumed, **keys)
    opt.load_state_dict(saved[1])
    run(resumed, opt, 3, start=2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not an fsam optimizer state"):
        build("fsam", resumed, **keys).load_state_dict(build("sam", resumed).state_dict())


@pytest.mark.parametrize("name", WRAPPERS)
def test_no_wrapper_is_a_base(block_mlp, name):
    """sam, asam, gam and fsam refuse each other (and themselves) as base, naming the valid
    bases; any non-wrapper is accepted (mars, lion)."""
    for other in WRAPPERS:
        with pytest.raises(ConfigError, match=rf"optimizer \({name}\): base: base optimizer "
                                              rf"'{other}' cannot be a base.*valid bases: adamw"):
            build(name, block_mlp, base=other)
    with pytest.raises(ConfigError, match=r"unknown base optimizer 'adam'; known: .*mars"):
        build(name, block_mlp, base="adam")
    assert type(build(name, block_mlp, base="mars").base).__name__ == "MARS"
    assert type(build(name, block_mlp, base="lion", base_params={"betas": (0.9, 0.98)})
                .base).__name__ == "Lion"


def test_a_base_that_needs_a_closure_is_refused(block_mlp):
    """An optimiser that is not a wrapper by its config but whose optimiser needs a closure is
    refused when the wrapper builds it."""
    class Needy(torch.optim.SGD):
        needs_closure = True

    class NeedyConfig(OptimizerConfig):
        method: str = "needy"

    OPTIMIZERS.register("needy", NeedyConfig, build=lambda model, config: Needy(
        model.parameters(), lr=config.lr))
    try:
        with pytest.raises(ValueError, match="base optimizer 'needy' needs a closure"):
            build("gam", block_mlp, base="needy")
    finally:
        OPTIMIZERS.unregister("needy")


def test_gam_and_fsam_bad_keys_are_clear_errors(block_mlp):
    with pytest.raises(ConfigError, match=r"optimizer \(gam\): alpha: .*less than or equal to 1"):
        build("gam", block_mlp, alpha=1.5)
    with pytest.raises(ConfigError, match=r"optimizer \(gam\): eta: unknown parameter; known: "
                                          r"lr, weight_decay, betas, eps, base, base_params, rho"):
        build("gam", block_mlp, eta=0.1)
    with pytest.raises(ConfigError, match=r"optimizer \(fsam\): sparsity: .*less than 1"):
        build("fsam", block_mlp, sparsity=1.0)
    with pytest.raises(ConfigError, match=r"optimizer \(fsam\): mask_interval: .*greater than"):
        build("fsam", block_mlp, mask_interval=0)
    with pytest.raises(ConfigError, match=r"optimizer \(gam\) base \(adamw\): rnak: unknown"):
        build("gam", block_mlp, base_params={"rnak": 4})


@pytest.mark.parametrize("name", ["sam", "gam", "fsam"])
def test_a_resumed_wrapper_keeps_the_schedule_reaching_the_base(block_mlp, name):
    """load_state_dict gives the base new parameter-group dicts; the wrapper shares them again,
    so the loop's lr schedule (built on the wrapper) still sets the base's lr."""
    model = copy.deepcopy(block_mlp)
    opt = build(name, model, lr=1e-3)
    run(model, opt, 1)
    saved = copy.deepcopy(opt.state_dict())
    opt = build(name, model, lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    opt.load_state_dict(saved)
    assert opt.param_groups is opt.base.param_groups
    run(model, opt, 1, start=1)
    schedule.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(5e-4)
