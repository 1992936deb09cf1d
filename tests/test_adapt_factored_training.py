"""Method-specific claims of the factored training parameterisations SLTrain, LOST and SST on real
layers: copies of SmolLM2's layer-0 projections q_proj (576x576), v_proj (192x576) and gate_proj
(1536x576), fed the layer's real normalised PTB embeddings, and MiniLM (every linear biased).

SLTrain: the support has the requested density, is fixed through training and regenerates from
the config. LOST: the split is the documented one (top-r SVD part plus whole columns of the
remainder, chosen by column norm). Both: keep_base starts exactly and reloads. SST: one step moves
only the sampled singular-vector pairs and every σ; re-sampling keeps the product and
re-orthogonalises; sampling follows σ; a resumed run continues bit for bit. All three: a layer
without a base loads without reading the fresh weight; settings that do not fit are refused
before the model changes.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import slimtune.adapt as adapt
from slimtune.adapt.sst import sample_pairs
from slimtune.layers import FactoredLinear
from slimtune.targets import factored_layers
from real_layers import layer0_copies as layers
from test_adapt_svd_methods import block0, rel, x  # noqa: F401  (fixtures: layer 0, its input)

R = 8
NAMES = ["q_proj", "v_proj", "gate_proj"]


def apply(model, method, **params):
    return adapt.apply(model, method, r=R, targets=NAMES, progress=False, **params)


def targets(block0, x):
    """Regression targets: the original layers' outputs on ``x`` plus a fixed perturbation."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return {n: m(x) + 0.1 * torch.randn(m(x).shape, generator=g)
                for n, m in layers(block0).items()}


def train(model, x, wanted, steps, optimizer, first=1, hook=True):
    """``steps`` optimiser steps on the sum of the layers' MSE; the method's ``after_step`` runs
    (unless not ``hook``) with the number of steps done (``first`` after the first of these)."""
    for step in range(first, first + steps):
        optimizer.zero_grad()
        loss = sum((model[n](x) - wanted[n]).square().mean() for n in NAMES)
        loss.backward()
        optimizer.step()
        if hook:
            adapt.after_step(model, step)


def adamw(model, lr=1e-3):
    return torch.optim.AdamW(adapt.trainable_parameters(model).values(), lr=lr, weight_decay=0.0)


# -- SLTrain -------------------------------------------------------------------------------------
def test_sltrain_support_density_and_initialisation(block0, x):
    model = apply(layers(block0), "sltrain", alpha=16.0)
    for name, layer in factored_layers(model).items():
        n_out, n_in = layer.out_features, layer.in_features
        idx = layer.sparse.indices
        assert layer.base is None and layer.sparse.nnz == int(0.03 * n_out * n_in)
        assert abs(layer.sparse.nnz / (n_out * n_in) - 0.03) < 1e-4
        assert bool((idx[1:] > idx[:-1]).all()) and 0 <= int(idx[0]) and int(idx[-1]) < n_out * n_in
        bound = 1 / math.sqrt(n_in)
        lr = layer.lowrank
        assert lr.scale == 16.0 / R and not lr.B.any()
        with torch.no_grad():
            v = layer.sparse.values
            assert float(lr.A.abs().max()) <= bound and float(v.abs().max()) <= bound
            assert float(v.std()) > 0.5 * bound  # uniform, not zero
            S = layer.sparse.delta_weight()  # the layer is s·B·A + S and nothing else (B = 0)
            assert torch.equal(layer.dense_weight(), (lr.B @ lr.A) * lr.scale + S)
            assert rel(layer(x), x @ S.T) < 1e-6
    again = apply(layers(block0), "sltrain")
    other = apply(layers(block0), "sltrain", seed=1)
    for name in NAMES:  # the support regenerates from (seed, layer name)
        assert torch.equal(again[name].sparse.indices, model[name].sparse.indices)
        assert not torch.equal(other[name].sparse.indices, model[name].sparse.indices)
    assert not torch.equal(model["q_proj"].sparse.indices[:100],
                           model["v_proj"].sparse.indices[:100])


def test_sltrain_support_stays_fixed_while_training(block0, x):
    model = apply(layers(block0), "sltrain", density=0.05)
    before = {n: (layer.sparse.indices.clone(), layer.sparse.values.detach().clone())
              for n, layer in factored_layers(model).items()}
    train(model, x, targets(block0, x), 3, adamw(model))
    for name, layer in factored_layers(model).items():
        idx, values = before[name]
        assert torch.equal(layer.sparse.indices, idx)
        assert not torch.equal(layer.sparse.values, values) and layer.lowrank.B.any()
        with torch.no_grad():  # what is not low-rank lies on the support only
            rest = (layer.dense_weight() - layer.lowrank.delta_weight()).reshape(-1)
        off = torch.ones_like(rest, dtype=torch.bool)
        off[idx] = False
        assert not rest[off].any() and int((rest != 0).sum()) <= idx.numel()


# -- LOST ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_base", [False, True])
def test_lost_split_is_the_documented_one(block0, x, keep_base):
    originals = layers(block0)
    model = apply(layers(block0), "lost", density=0.03, keep_base=keep_base)
    for name, layer in factored_layers(model).items():
        W = originals[name].weight.detach().double()
        n_out, n_in = W.shape
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        top = U[:, :R] * S[:R] @ Vh[:R]
        low = layer.lowrank.delta_weight().double().detach()
        assert rel(low, top) < 1e-5  # s·B·A: the top-r singular components
        rest = W - low
        assert float((U[:, :R].T @ rest).abs().max()) < 1e-5 * float(S[0])  # the remaining ones
        k = int(0.03 * n_in)
        columns = torch.topk(rest.norm(dim=0), k).indices.sort().values
        idx = layer.sparse.indices
        assert layer.sparse.nnz == k * n_out
        assert torch.equal(torch.unique(idx % n_in), columns)  # whole columns, the largest norms
        assert rel(layer.sparse.delta_weight().double()[:, columns], rest[:, columns]) < 1e-6
        with torch.no_grad():
            dense = layer.dense_weight().double()
        dropped = rest.clone()
        dropped[:, columns] = 0
        if keep_base:  # frozen remainder outside the channels: W exactly
            assert rel(dense, W) < 1e-6
            assert torch.equal(torch.unique(torch.nonzero(~layer.mask)[:, 1]), columns)
            assert layer.origin is not None and layer.base is not None
        else:  # s·B·A + S: W without the remainder outside the channels
            assert layer.base is None and rel(dense, W - dropped) < 1e-6
            assert rel(dense - W, -dropped) < 1e-4
    with torch.no_grad():
        outs = [model[n](x) for n in NAMES]
        refs = [originals[n](x) for n in NAMES]
    assert all((rel(o, r) < 1e-5) == keep_base for o, r in zip(outs, refs))


# -- SST -----------------------------------------------------------------------------------------
def sampled(layer: FactoredLinear) -> torch.Tensor:
    return torch.nonzero(layer.lowrank.grad_scale).reshape(-1)


def test_sst_step_moves_only_the_sampled_pairs_and_every_sigma(block0, x):
    model = apply(layers(block0), "sst", update_every=5)
    before = {n: {k: p.detach().clone() for k, p in layer.lowrank.named_parameters()}
              for n, layer in factored_layers(model).items()}
    train(model, x, targets(block0, x), 1, adamw(model))
    for name, layer in factored_layers(model).items():
        m = min(layer.out_features, layer.in_features)
        lr, old, pairs = layer.lowrank, before[name], sampled(layer)
        assert lr.rank == m and pairs.numel() == R
        assert torch.equal(pairs, sample_pairs(old["core"], R, 0, name, 0))
        moved_u = torch.nonzero((lr.B != old["B"]).any(dim=0)).reshape(-1)
        moved_v = torch.nonzero((lr.A != old["A"]).any(dim=1)).reshape(-1)
        assert torch.equal(moved_u, pairs) and torch.equal(moved_v, pairs)
        assert bool((lr.core != old["core"]).all())  # every singular value trains


def orthonormality_error(M: torch.Tensor) -> float:
    M = M.detach().double()
    return float((M.T @ M - torch.eye(M.shape[1], dtype=M.dtype)).abs().max())


def test_sst_resampling_reorthogonalises_and_keeps_the_product(block0, x):
    T = 3
    model = apply(layers(block0), "sst", update_every=T)
    wanted, opt = targets(block0, x), adamw(model, lr=3e-3)
    first = {n: sampled(layer) for n, layer in factored_layers(model).items()}
    train(model, x, wanted, T - 1, opt)  # steps 1, 2: no re-sampling yet
    assert all(torch.equal(sampled(layer), first[n])
               for n, layer in factored_layers(model).items())
    train(model, x, wanted, 1, opt, first=T, hook=False)  # step T, before its after_step
    layers_ = factored_layers(model)
    product = {n: layer.lowrank.delta_weight().detach().double() for n, layer in layers_.items()}
    assert max(orthonormality_error(layer.lowrank.B) for layer in layers_.values()) > 1e-5
    adapt.after_step(model, T)
    for name, layer in layers_.items():
        lr = layer.lowrank
        assert orthonormality_error(lr.B) < 1e-5 and orthonormality_error(lr.A.T) < 1e-5
        assert rel(lr.delta_weight().detach(), product[name]) < 1e-5
        assert bool((lr.core[:-1] >= lr.core[1:]).all()) and float(lr.core.detach().min()) >= 0
        assert torch.equal(sampled(layer), sample_pairs(lr.core, R, 0, name, T))
        assert not torch.equal(sampled(layer), first[name])


def test_sst_samples_pairs_in_proportion_to_sigma(block0):
    S = torch.linalg.svdvals(block0.self_attn.q_proj.weight.detach().double())
    n = 4000
    counts = torch.zeros_like(S)
    for step in range(n):
        counts[sample_pairs(S, 1, 0, "q_proj", step)] += 1
    top = S.argsort(descending=True)[: S.numel() // 4]
    p = float(S[top].sum() / S.sum())  # expected share of the top quarter of σ
    assert abs(float(counts[top].sum()) / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(sample_pairs(S, R, 3, "q_proj", 7), sample_pairs(S, R, 3, "q_proj", 7))
    assert not torch.equal(sample_pairs(S, R, 3, "q_proj", 7), sample_pairs(S, R, 3, "q_proj", 8))


def test_sst_resumed_run_continues_exactly(block0, x, tmp_path):
    wanted, T, steps, stop = targets(block0, x), 2, 5, 3  # re-sampled at 2 and 4, stopped at 3
    whole = apply(layers(block0), "sst", update_every=T)
    train(whole, x, wanted, steps, adamw(whole))
    first = apply(layers(block0), "sst", update_every=T)
    opt = adamw(first)
    train(first, x, wanted, stop, opt)
    path = adapt.save(first, tmp_path / "checkpoint")
    state = copy.deepcopy(opt.state_dict())
    zeroed = layers(block0)  # the fresh weights are not read: layers without a base
    for linear in zeroed.values():
        nn.init.zeros_(linear.weight)
    resumed = adapt.load(zeroed, path)
    opt = adamw(resumed)
    opt.load_state_dict(state)
    train(resumed, x, wanted, steps - stop, opt, first=stop + 1)
    for name, layer in factored_layers(whole).items():
        other = factored_layers(resumed)[name].lowrank
        for key, tensor in layer.lowrank.state_dict().items():
            assert torch.equal(tensor, other.state_dict()[key]), f"{name}.{key}"


# -- all three -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sltrain", "lost"])
def test_keep_base_starts_exactly_and_reloads_on_an_encoder(minilm, tmp_path, method):
    """MiniLM, every linear (biased) adapted with keep_base: exact start; save/load rebuilds the
    base (LOST: from its origin, with the channel mask) and the trained outputs."""
    base, tok = minilm
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]

    def hidden(model):
        with torch.no_grad():
            return model(ids).last_hidden_state

    expected = hidden(base)
    model = adapt.apply(copy.deepcopy(base), method, r=R, targets="all-linear", keep_base=True,
                        progress=False)
    assert adapt.adapter_config(model).exact_start
    for layer in factored_layers(model).values():
        assert layer.base is not None and layer.bias is not None
        if method == "sltrain":  # both updates start at exactly zero
            assert not layer.lowrank.B.any() and not layer.sparse.values.any()
    assert rel(hidden(model), expected) < (1e-6 if method == "sltrain" else 1e-5)
    with torch.no_grad():
        for p in adapt.trainable_parameters(model).values():
            p.add_(0.01 * torch.randn_like(p))
    trained = hidden(model)
    assert rel(trained, expected) > 1e-3
    loaded = adapt.load(copy.deepcopy(base), adapt.save(model, tmp_path / "adapter"))
    assert rel(hidden(loaded), trained) < 1e-6
    pairs = zip(factored_layers(loaded).values(), factored_layers(model).values())
    assert all(a.mask_bits is b.mask_bits is None if method == "sltrain"
               else torch.equal(a.mask_bits, b.mask_bits) for a, b in pairs)


@pytest.mark.parametrize("method", ["sltrain", "lost", "sst"])
def test_layers_without_a_base_load_without_the_fresh_weight(block0, x, method, tmp_path):
    model = apply(layers(block0), method)
    with torch.no_grad():
        for p in adapt.trainable_parameters(model).values():
            p.add_(0.01 * torch.randn_like(p))
        expected = [model[n](x) for n in NAMES]
    path = adapt.save(model, tmp_path / "adapter")
    fresh = layers(block0)
    for linear in fresh.values():
        nn.init.normal_(linear.weight)
    loaded = adapt.load(fresh, path)
    assert all(layer.base is None for layer in factored_layers(loaded).values())
    with torch.no_grad():
        assert all(torch.equal(loaded[n](x), e) for n, e in zip(NAMES, expected))


@pytest.mark.parametrize("method,params,match", [
    ("sltrain", {"density": 1e-6}, r"sltrain: density=1e-06 keeps no entry of q_proj"),
    ("lost", {"density": 1e-3}, r"lost: density=0.001 keeps no input channel of q_proj"),
    ("sst", {"r": 193}, r"sst: r=193 exceeds min\(out, in\) = 192 of v_proj"),
])
def test_settings_that_do_not_fit_a_layer_are_refused_before_any_change(block0, method, params,
                                                                         match):
    model = layers(block0)
    with pytest.raises(ValueError, match=match):
        adapt.apply(model, method, targets=NAMES, progress=False, **{"r": R, **params})
    assert not factored_layers(model) and getattr(model, "slimtune_adapter", None) is None

