"""Method-specific claims of the sparse adapters SFT (SpIEL-AG), SaRA and DSEE on real layers:
copies of SmolLM2's layer-0 projections q_proj (576x576), v_proj (192x576) and gate_proj
(1536x576) fed the layer's real normalised PTB embeddings, and SmolLM2's first two blocks in
the training loop (interrupted and resumed).

SFT: the random support has the density and regenerates from the config; the dense gradient is
formed only on the steps before an update and summed in the method state; an update keeps k,
drops the smallest deltas, regrows the largest accumulated gradients, zeroes the regrown
entries' optimiser state. SaRA: exactly the smallest entries train; the nuclear norm is one
seeded layer's; the re-selection keeps the function, merges what left the support into the
origin, re-selects the now-smallest entries and reloads exactly. DSEE: the documented support
(residual of a rank-q fit, magnitude, random); an exact start; the optional pruned base. Both
schedules resume exactly through ``slimtune.train.train`` after a crash; settings that do not
fit are refused before the model changes.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import slimtune.adapt as adapt
from slimtune.adapt.api import method_state
from slimtune.adapt.registry import make_config
from slimtune.adapt.sft import replaced_fraction
from slimtune.layers import DenseBase, FactoredLinear, SparseDelta
from slimtune.targets import factored_layers
from slimtune.train import train
from slimtune.weights.svd import randomized_svd
from real_layers import first_blocks, layer0_copies as layers
from test_adapt_svd_methods import block0, rel, x  # noqa: F401  (fixtures: layer 0, its input)
from test_train import CrashAt, lm_task, small_config  # noqa: F401  (lm_task: a fixture)

R = 8
NAMES = ["q_proj", "v_proj", "gate_proj"]


def apply(model, method, **params):
    return adapt.apply(model, method, r=R, targets=NAMES, progress=False, **params)


def targets(block0, x):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return {n: m(x) + 0.1 * torch.randn(m(x).shape, generator=g)
                for n, m in layers(block0).items()}


def adamw(model, lr=1e-3):
    return torch.optim.AdamW(adapt.trainable_parameters(model).values(), lr=lr, weight_decay=0.0)


def backward(model, x, wanted, done, optimizer):
    """The first half of a training-loop step: ``before_step``, the loss (with the method's
    term), backward, ``after_backward``, the optimiser step."""
    adapt.before_step(model, done)
    optimizer.zero_grad()
    loss = sum((model[n](x) - wanted[n]).square().mean() for n in NAMES)
    extra = adapt.extra_loss(model)
    (loss if extra is None else loss + extra).backward()
    adapt.after_backward(model, done)
    optimizer.step()


def steps(model, x, wanted, optimizer, first, last):
    """Training-loop steps ``first..last`` (1-based) with every hook."""
    for t in range(first, last + 1):
        backward(model, x, wanted, t - 1, optimizer)
        adapt.after_step(model, t, optimizer)


def smallest(scores: torch.Tensor, k: int) -> set[int]:
    order = torch.sort(scores.reshape(-1).double(), stable=True).indices
    return set(order[:k].tolist())


def largest(scores: torch.Tensor, k: int) -> set[int]:
    order = torch.sort(scores.reshape(-1).double(), descending=True, stable=True).indices
    return set(order[:k].tolist())


def dense_grads(model, x, wanted) -> dict[str, torch.Tensor]:
    """∂L/∂W of each layer's whole weight, computed apart from the method."""
    out = {}
    for n in NAMES:
        layer = model[n]
        W = layer.dense_weight().detach().requires_grad_(True)
        loss = (F.linear(x, W, layer.bias) - wanted[n]).square().mean()
        out[n] = torch.autograd.grad(loss, W)[0].float()
    return out


# -- SFT -----------------------------------------------------------------------------------------
def test_sft_support_is_random_with_the_density_and_starts_exactly(block0, x):
    model = apply(layers(block0), "sft", density=0.02)
    originals = layers(block0)
    for name, layer in factored_layers(model).items():
        idx, numel = layer.sparse.indices, layer.out_features * layer.in_features
        assert layer.sparse.nnz == int(0.02 * numel) and idx.unique().numel() == idx.numel()
        assert not layer.sparse.values.any() and layer.lowrank is None
        with torch.no_grad():
            assert torch.equal(layer(x), originals[name](x))
    again = apply(layers(block0), "sft", density=0.02)
    other = apply(layers(block0), "sft", density=0.02, seed=1)
    for name in NAMES:
        assert torch.equal(again[name].sparse.indices, model[name].sparse.indices)
        assert not torch.equal(other[name].sparse.indices, model[name].sparse.indices)


def test_sft_gradient_is_dense_only_in_the_window_before_an_update(block0, x):
    wanted = targets(block0, x)
    model = apply(layers(block0), "sft", update_every=4, accumulate=2)  # updates at 2, 6, 10
    method_state(model)["total_steps"] = 20
    opt = adamw(model)
    steps(model, x, wanted, opt, 1, 2)  # the first window and update
    expected = {n: torch.zeros(model[n].out_features, model[n].in_features) for n in NAMES}
    state = method_state(model)
    for t in range(3, 8):  # steps 3, 4 and 7: no window; steps 5 and 6: the window of update 6
        adapt.before_step(model, t - 1)
        armed = [model[n].base.weight.requires_grad for n in NAMES]
        assert armed == [t in (5, 6)] * 3
        grads = dense_grads(model, x, wanted)
        backward(model, x, wanted, t - 1, opt)
        assert not any(model[n].base.weight.requires_grad or model[n].base.weight.grad is not None
                       for n in NAMES)
        if t in (5, 6):  # the sum over the window's steps
            for n in NAMES:
                expected[n] += grads[n]
                torch.testing.assert_close(state[f"sft/gradient/{n}"], expected[n],
                                           rtol=1e-5, atol=1e-9)
        else:
            assert not any(k.startswith("sft/gradient/") for k in state)
        indices = [model[n].sparse.indices.clone() for n in NAMES]
        adapt.after_step(model, t, opt)
        moved = [not torch.equal(model[n].sparse.indices, i) for n, i in zip(NAMES, indices)]
        assert moved == [t == 6] * 3  # the update used the sums and dropped them
    assert not any(k.startswith("sft/gradient/") for k in state)


def test_sft_update_keeps_k_drops_the_smallest_deltas_regrows_the_largest_gradients(block0, x):
    wanted = targets(block0, x)
    model = apply(layers(block0), "sft", update_every=3, accumulate=2, drop=0.5)
    state = method_state(model)
    state["total_steps"] = 100
    opt = adamw(model)
    start, done = {n: model[n].sparse.indices.clone() for n in NAMES}, 0
    for t, first in ((2, True), (5, False)):  # the first update replaces all; then p = 0.475
        steps(model, x, wanted, opt, done + 1, t - 2)  # step 3: outside the windows
        done, window = t, {n: 0 for n in NAMES}
        for step in (t - 1, t):  # the window: two steps, each summed apart from the method
            grads = dense_grads(model, x, wanted)
            window = {n: window[n] + grads[n] for n in NAMES}
            backward(model, x, wanted, step - 1, opt)
            if step < t:
                adapt.after_step(model, step, opt)
        for n in NAMES:
            torch.testing.assert_close(state[f"sft/gradient/{n}"], window[n], rtol=1e-5,
                                       atol=1e-9)
        before = {n: (model[n].sparse.indices.clone(), model[n].sparse.values.detach().clone(),
                      {k: v.clone() for k, v in opt.state[model[n].sparse.values].items()},
                      window[n]) for n in NAMES}
        adapt.after_step(model, t, opt)
        assert not any(k.startswith("sft/gradient/") for k in state)
        for n in NAMES:
            sparse = model[n].sparse
            idx, values, moments, g = before[n]
            k = idx.numel()
            assert sparse.nnz == k and sparse.indices.unique().numel() == k
            assert sparse.values.shape == (k,)
            if first:  # the whole support becomes the top-k accumulated gradients
                assert set(sparse.indices.tolist()) == largest(g.abs(), k)
                assert not torch.equal(sparse.indices, start[n])
                continue
            n_drop = int(replaced_fraction(t, adapt.adapter_config(model), 100) * k)
            assert n_drop == int(0.5 * (1 - 5 / 100) * k) > 0
            dropped = smallest(values.abs(), n_drop)
            remaining = set(idx.tolist()) - {int(idx[i]) for i in dropped}
            g = g.abs().reshape(-1).clone()
            g[list(remaining)] = -1
            regrown = largest(g, n_drop)
            assert set(sparse.indices.tolist()) == remaining | regrown
            changed = torch.nonzero(sparse.indices != idx).squeeze(1)
            assert 0 < changed.numel() <= n_drop
            assert set(changed.tolist()) <= dropped
            assert not sparse.values[changed].any()
            kept = torch.ones(k, dtype=torch.bool)
            kept[changed] = False
            assert torch.equal(sparse.values[kept], values[kept])
            for key in ("exp_avg", "exp_avg_sq"):
                now = opt.state[sparse.values][key]
                assert not now[changed].any() and moments[key][changed].abs().sum() > 0
                assert torch.equal(now[kept], moments[key][kept])


def test_sft_drop_fraction_decays_linearly_and_skips_other_steps():
    config = make_config("sft", update_every=10, accumulate=3, drop=0.2)
    assert replaced_fraction(3, config, 100) == 1.0  # the first update replaces all
    assert replaced_fraction(13, config, 100) == pytest.approx(0.2 * (1 - 13 / 100))
    assert replaced_fraction(93, config, 100) == pytest.approx(0.2 * (1 - 93 / 100))
    assert [replaced_fraction(t, config, 100) for t in (1, 2, 4, 10, 12, 14)] == [0.0] * 6
    late = make_config("sft", update_every=10, accumulate=3, regrow_all_first=False)
    assert replaced_fraction(3, late, 100) == pytest.approx(0.2 * 0.97)


# -- SaRA ----------------------------------------------------------------------------------------
def test_sara_trains_exactly_the_smallest_entries(block0, x):
    model = apply(layers(block0), "sara", fraction=0.15)
    originals = layers(block0)
    for name, layer in factored_layers(model).items():
        W = originals[name].weight
        k = int(0.15 * W.numel())
        assert layer.sparse.nnz == k and not layer.sparse.values.any()
        assert set(layer.sparse.indices.tolist()) == smallest(W.abs(), k)
        chosen = W.reshape(-1)[layer.sparse.indices].abs()
        rest = torch.ones(W.numel(), dtype=torch.bool)
        rest[layer.sparse.indices] = False
        assert chosen.max() <= W.reshape(-1)[rest].abs().min()
        with torch.no_grad():
            assert torch.equal(layer(x), originals[name](x))


def test_sara_nuclear_norm_is_one_seeded_layers_update(block0, x):
    model = apply(layers(block0), "sara", rank_weight=1e-2)
    state, chosen = method_state(model), []

    def penalty(t):
        """The step-``t`` term, the one layer its gradient reaches, and that gradient."""
        state["sara/steps"] = t
        loss = adapt.extra_loss(model)
        loss.backward()
        grads = {n: model[n].sparse.values.grad for n in NAMES}
        for n in NAMES:
            model[n].sparse.values.grad = None
        reached = [n for n, g in grads.items() if g is not None]
        assert len(reached) == 1
        return loss.detach(), reached[0], grads[reached[0]]

    loss, _, grad = penalty(0)  # at P = 0: no penalty, and the sub-gradient 0
    assert loss == 0 and not grad.any()
    with torch.no_grad():
        for p in adapt.trainable_parameters(model).values():
            p.add_(1e-3 * torch.randn_like(p))
    for t in range(6):
        loss, name, grad = penalty(t)
        chosen.append(name)
        P = model[name].sparse.delta_weight().detach()
        torch.testing.assert_close(loss, 1e-2 * torch.linalg.svdvals(P).sum())
        U, _, Vh = torch.linalg.svd(P, full_matrices=False)  # d||P||_*/dP = U·Vᵀ, on the support
        torch.testing.assert_close(grad, 1e-2 * (U @ Vh).reshape(-1)[model[name].sparse.indices],
                                   rtol=1e-4, atol=1e-8)
    assert len(set(chosen)) > 1  # the draw moves with the step and repeats for a step
    assert [penalty(t)[1] for t in range(6)] == chosen


def test_sara_reselection_merges_and_reselects_the_smallest_then_reloads(block0, x, tmp_path):
    wanted = targets(block0, x)
    model = apply(layers(block0), "sara", reselect_at=0.5, rank_weight=0.0)
    method_state(model)["total_steps"] = 6  # re-selection after step 3
    opt = adamw(model, lr=3e-3)
    steps(model, x, wanted, opt, 1, 2)
    assert all(model[n].origin is None for n in NAMES)
    backward(model, x, wanted, 2, opt)
    with torch.no_grad():
        before = {n: (model[n](x), model[n].sparse.indices.clone(),
                      model[n].sparse.values.detach().clone(), model[n].dense_weight().clone(),
                      {k: v.clone() for k, v in opt.state[model[n].sparse.values].items()})
                  for n in NAMES}
    originals = layers(block0)
    adapt.after_step(model, 3, opt)
    merged = {n: model[n].origin.indices.clone() for n in NAMES}
    for n in NAMES:
        layer, (out, idx, values, weight, moments) = model[n], before[n]
        k = idx.numel()
        with torch.no_grad():
            assert rel(layer(x), out) < 1e-6  # the function is kept
            assert rel(layer.dense_weight(), weight) < 1e-6
        assert set(layer.sparse.indices.tolist()) == smallest(weight.abs(), k)
        changed = torch.nonzero(layer.sparse.indices != idx).squeeze(1)
        assert changed.numel() > 0 and layer.sparse.nnz == k
        assert torch.equal(layer.origin.indices, idx[changed])  # merged: what left the support
        assert torch.equal(layer.origin.values, -values[changed])
        assert not layer.origin.values.requires_grad
        assert torch.equal(layer.base.weight, originals[n].weight - layer.origin.delta_weight())
        assert not layer.sparse.values[changed].any()
        kept = torch.ones(k, dtype=torch.bool)
        kept[changed] = False
        assert torch.equal(layer.sparse.values[kept], values[kept])
        for key in ("exp_avg", "exp_avg_sq"):
            now = opt.state[layer.sparse.values][key]
            assert not now[changed].any() and torch.equal(now[kept], moments[key][kept])
    steps(model, x, wanted, opt, 4, 6)
    assert all(torch.equal(model[n].origin.indices, merged[n]) for n in NAMES)  # once only
    with torch.no_grad():
        trained = [model[n](x) for n in NAMES]
    path = adapt.save(model, tmp_path / "adapter")
    loaded = adapt.load(layers(block0), path)
    with torch.no_grad():
        assert all(rel(loaded[n](x), t) < 1e-6 for n, t in zip(NAMES, trained))
    assert all(torch.equal(loaded[n].base.weight, model[n].base.weight) for n in NAMES)
    assert sorted(adapt.trainable_parameters(loaded)) == [f"{n}.sparse.values" for n in
                                                          sorted(NAMES)]


# -- DSEE ----------------------------------------------------------------------------------------
def test_dsee_sparse_positions_follow_the_documented_rule(block0):
    originals = layers(block0)
    N, q = 64, 4
    residual = apply(layers(block0), "dsee", n_sparse=N, decompose_rank=q, decompose_iters=2)
    magnitude = apply(layers(block0), "dsee", n_sparse=N, select="magnitude")
    random = apply(layers(block0), "dsee", n_sparse=N, select="random")
    again = apply(layers(block0), "dsee", n_sparse=N, select="random")
    for n in NAMES:
        W = originals[n].weight.detach()
        S = torch.zeros_like(W)
        for _ in range(2):  # GoDec: L = rank-q SVD of W - S, S = the N largest |W - L|
            U, sigma, Vh = randomized_svd(W - S, q, seed=0)
            E = W - (U * sigma) @ Vh
            top = sorted(largest(E.abs(), N))
            S = torch.zeros_like(W).reshape(-1)
            S[top] = E.reshape(-1)[top]
            S = S.view_as(W)
        assert residual[n].sparse.indices.tolist() == top
        assert set(magnitude[n].sparse.indices.tolist()) == largest(W.abs(), N)
        assert set(top) != largest(W.abs(), N)  # the low-rank part changes the choice
        assert torch.equal(random[n].sparse.indices, again[n].sparse.indices)
        assert random[n].sparse.nnz == N


def test_dsee_starts_exactly_and_trains_low_rank_and_sparse(block0, x):
    wanted = targets(block0, x)
    model = apply(layers(block0), "dsee")
    originals = layers(block0)
    with torch.no_grad():
        assert all(torch.equal(model[n](x), originals[n](x)) for n in NAMES)
    for n in NAMES:
        assert model[n].sparse.nnz == 128 and not model[n].sparse.values.any()
        assert not model[n].lowrank.B.any() and model[n].lowrank.scale == 32.0 / R
    opt = adamw(model)
    steps(model, x, wanted, opt, 1, 2)
    assert all(model[n].sparse.values.all() and model[n].lowrank.B.any() for n in NAMES)


def test_dsee_pruned_base_masks_the_smallest_weights_and_reloads(block0, x, tmp_path):
    model = apply(layers(block0), "dsee", prune=0.3)
    assert not adapt.adapter_config(model).exact_start
    originals = layers(block0)
    for n in NAMES:
        W = originals[n].weight.detach()
        mask = model[n].mask
        assert int((~mask).sum()) == int(0.3 * W.numel())
        assert W.abs()[~mask].max() <= W.abs()[mask].min()  # the smallest magnitudes
        with torch.no_grad():
            assert rel(model[n](x), F.linear(x, W * mask)) < 1e-6
    with torch.no_grad():
        for p in adapt.trainable_parameters(model).values():
            p.add_(1e-2 * torch.randn_like(p))
        trained = [model[n](x) for n in NAMES]
    loaded = adapt.load(layers(block0), adapt.save(model, tmp_path / "adapter"))
    with torch.no_grad():
        assert all(rel(loaded[n](x), t) < 1e-6 for n, t in zip(NAMES, trained))


# -- the training loop: schedules resume exactly -------------------------------------------------
@pytest.fixture(scope="module")
def short(smollm2):
    """SmolLM2 with only its first 2 decoder blocks (a separate copy): a fast training loop."""
    return first_blocks(smollm2[0], 2)


@pytest.mark.parametrize("method,params", [
    # updates after steps 2 and 5, windows 1-2 and 4-5: the crash resumes from step 4's
    # checkpoint, inside a window, with its partial gradient sum in the method state
    ("sft", {"update_every": 3, "accumulate": 2, "density": 0.02}),
    # re-selection after step 3: the checkpoint of step 4 carries the origin it made
    ("sara", {"rank_weight": 1e-2}),
])
def test_schedule_resumes_exactly_after_a_crash(short, lm_task, tmp_path, method,  # noqa: F811
                                                 params):
    config = small_config(steps=6, warmup=2, save_every=2)
    adapter = make_config(method, targets=r"model\.layers\.1\..*", **params)
    _, full = train(copy.deepcopy(short), lm_task(), config, tmp_path / "full",
                    adapter=adapter, progress=False)
    with pytest.raises(KeyboardInterrupt):  # dies in step 6, after the checkpoint of step 4
        train(copy.deepcopy(short), CrashAt(lm_task(), 6), config, tmp_path / "cut",
              adapter=adapter, progress=False)
    _, resumed = train(copy.deepcopy(short), lm_task(), config, tmp_path / "cut",
                       adapter=adapter, resume=True, progress=False)
    assert resumed["resumed_at"] == [4]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in resumed["steps"]] == pytest.approx(
            [r[key] for r in full["steps"]], rel=1e-5)
    a = load_file(tmp_path / "full" / "adapter.safetensors")
    b = load_file(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    moved = [k for k in a if k.endswith("sparse.indices")]
    fresh = adapt.apply(copy.deepcopy(short), method, progress=False,
                        **adapter.model_dump(exclude={"method"}))
    start = {f"{n}.sparse.indices": layer.sparse.indices
             for n, layer in factored_layers(fresh).items()}
    assert moved and any(not torch.equal(a[k], start[k]) for k in moved)  # the schedule ran
    if method == "sara":
        assert any(k.endswith("origin.values") for k in a)


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,params,match", [
    ("sft", {"density": 1e-7}, r"sft: density=1e-07 keeps no entry of q_proj"),
    ("sara", {"fraction": 1e-7}, r"sara: fraction=1e-07 keeps no entry of q_proj"),
    ("dsee", {"n_sparse": 192 * 576 + 1}, r"dsee: n_sparse=110593 exceeds the 110592 entries"),
    ("dsee", {"decompose_rank": 193}, r"dsee: decompose_rank=193 exceeds min\(out, in\) = 192"),
    ("sft", {"accumulate": 5, "update_every": 4}, r"accumulate=5 exceeds update_every=4"),
    ("sara", {"reselect_at": 1.0}, r"reselect_at"),
])
def test_settings_that_do_not_fit_are_refused_before_any_change(block0, method, params, match):
    model = layers(block0)
    with pytest.raises(ValueError, match=match):
        adapt.apply(model, method, targets=NAMES, progress=False, **{"r": R, **params})
    assert not factored_layers(model) and getattr(model, "slimtune_adapter", None) is None


def test_a_frozen_sparse_origin_describes_and_rebuilds_itself():
    origin = SparseDelta((3, 4), torch.tensor([1, 5, 11]), torch.tensor([0.5, -1.0, 2.0]),
                         trainable=False)
    layer = FactoredLinear(4, 3, base=DenseBase(torch.zeros(3, 4)), origin=origin,
                           sparse=SparseDelta((3, 4), torch.tensor([0]), torch.zeros(1)))
    d = layer.describe()
    assert d["origin"] == {"kind": "sparse", "nnz": 3}
    empty = FactoredLinear.from_description(d)
    empty.load_state_dict(layer.state_dict())
    assert torch.equal(empty.origin.delta_weight(), origin.delta_weight())
