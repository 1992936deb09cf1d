"""Method-specific claims of the frugal adapters VeRA, NOLA, LoRA-XS and MiSS on real SmolLM2
layers (copies of layer-0 projections fed their real input; the whole model where the claim is
about the adapter on disk).

VeRA: every layer slices one shared random pair (one storage), only d and b train and are saved.
NOLA: the trainable count is k_A + k_B per layer whatever the rank and layer size; the factors are
the coefficient-weighted bases. LoRA-XS: only the r x r core trains and every update stays in the
weight's top-r singular subspace. MiSS: the update is Dᵀ·[I I ...] (padded), mini_r shares columns.
All: the adapter on disk holds only what trains (bytes ≈ 4 x trainable count), regenerated
factors come back at load, and settings that do not fit are refused before the model changes.
"""
from __future__ import annotations

import copy

import pytest
import torch

import slimtune.adapt as adapt
from slimtune.layers.fixed_factors import tiling
from slimtune.targets import factored_layers
from real_layers import layer0_copies as layers
from test_adapt_svd_methods import block0, rel, x  # noqa: F401  (fixtures: layer 0, its input)

NAMES = ["q_proj", "v_proj", "gate_proj"]


@torch.no_grad()
def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in adapt.trainable_parameters(model).values():
        p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def adapter_bytes(model, tmp_path) -> tuple[int, int]:
    """(bytes of adapter.safetensors, 4 x trainable parameters)."""
    path = adapt.save(model, tmp_path / "adapter")
    count = sum(p.numel() for p in adapt.trainable_parameters(model).values())
    return (path / "adapter.safetensors").stat().st_size, 4 * count


@pytest.mark.parametrize("method,params", [("vera", {"r": 64}), ("nola", {"r": 8}),
                                           ("miss", {"r": 32})])
def test_adapter_on_disk_holds_only_what_trains(smollm2, method, params, tmp_path):
    model = adapt.apply(copy.deepcopy(smollm2[0]), method, targets="all-linear", progress=False,
                        **params)
    randomise(model)
    size, trained = adapter_bytes(model, tmp_path)
    assert trained <= size < trained + 64 * 1024  # the safetensors header: names and shapes
    ids = torch.arange(10, 30)[None]
    with torch.no_grad():
        expected = model(ids).logits
        loaded = adapt.load(copy.deepcopy(smollm2[0]), tmp_path / "adapter")
        assert rel(loaded(ids).logits, expected) < 1e-6


def test_vera_layers_share_one_random_pair(block0, x):
    model = adapt.apply(layers(block0), "vera", r=64, targets=NAMES, progress=False)
    parts = [layer.lowrank for layer in factored_layers(model).values()]
    assert len({p.A.untyped_storage().data_ptr() for p in parts}) == 1
    assert len({p.B.untyped_storage().data_ptr() for p in parts}) == 1
    q, v, gate = parts
    assert torch.equal(q.A, gate.A) and torch.equal(v.B, q.B[:192])  # slices of one pair
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {
        f"{n}.lowrank.{w}" for n in NAMES for w in ("d", "b")}
    assert all(p.d.shape == (64,) for p in parts)


def test_vera_rank_may_exceed_the_layer(block0, x):
    model = adapt.apply(layers(block0), "vera", r=1024, targets=NAMES, progress=False)
    randomise(model)
    layer = model["v_proj"]
    assert rel(layer(x), torch.nn.functional.linear(x, layer.dense_weight())) < 1e-5


def test_nola_trains_the_coefficients_only(block0, x):
    for r in (4, 16):
        model = adapt.apply(layers(block0), "nola", r=r, num_basis_A=32, num_basis_B=48,
                            targets=NAMES, progress=False)
        counts = {k: p.numel() for k, p in adapt.trainable_parameters(model).items()}
        assert sum(counts.values()) == len(NAMES) * (32 + 48)
    randomise(model)
    part = model["gate_proj"].lowrank
    A = (part.alpha[:, None, None] * part.A_bases).sum(0)
    B = (part.beta[:, None, None] * part.B_bases).sum(0)
    assert rel(part.delta_weight(), part.scale * B @ A) < 1e-5
    assert part.A_bases.shape == (32, 16, 576) and part.B_bases.shape == (48, 1536, 16)
    assert model["q_proj"].lowrank.A_bases.data_ptr() == part.A_bases.data_ptr()  # same in-size


def test_lora_xs_update_stays_in_the_top_singular_subspace(block0, x):
    model = adapt.apply(layers(block0), "lora_xs", r=8, svd="exact", targets=NAMES,
                        progress=False)
    randomise(model)
    for name in NAMES:
        layer = model[name]
        assert {k for k, p in layer.named_parameters() if p.requires_grad} == {"lowrank.core"}
        assert layer.lowrank.core.shape == (8, 8)
        U, S, Vh = torch.linalg.svd(layer.base.weight.double(), full_matrices=False)
        P, Q = U[:, :8], Vh[:8]
        delta = layer.lowrank.delta_weight().double()
        assert rel(P @ (P.T @ delta @ Q.T) @ Q, delta) < 1e-4
        assert float(delta.detach().abs().max()) > 0


def test_miss_update_is_the_shard_tiled_over_the_input(block0, x):
    model = adapt.apply(layers(block0), "miss", r=100, targets=NAMES, progress=False)
    randomise(model)
    layer = model["v_proj"]
    D = layer.lowrank.D
    T = torch.zeros(100, 576)
    for j in range(576):
        T[j % 100, j] = 1
    assert torch.equal(tiling(100, 576), T)
    assert rel(layer.lowrank.delta_weight(), D.mT @ T) < 1e-6
    assert rel(layer(x), torch.nn.functional.linear(x, layer.dense_weight())) < 1e-5


def test_miss_mini_shares_columns(block0):
    model = adapt.apply(layers(block0), "miss", r=16, mini_r=64, targets=NAMES, progress=False)
    randomise(model)
    part = model["gate_proj"].lowrank
    assert part.D.shape == (16, 64)
    delta = part.delta_weight()
    assert torch.equal(delta[:64], delta[64:128])  # output rows repeat every mini_r


@pytest.mark.parametrize("method,params,message", [
    ("miss", {"r": 16, "mini_r": 100}, "mini_r=100 does not divide the output size"),
    ("miss", {"r": 600}, "r=600 exceeds .* = 576 of q_proj"),
    ("nola", {"r": 8, "num_basis_A": 0}, "num_basis_A"),
    ("lora_xs", {"r": 200}, r"r=200 exceeds min\(out, in\) = 192 of v_proj"),
])
def test_bad_settings_are_refused_before_the_model_changes(block0, method, params, message):
    model = layers(block0)
    with pytest.raises(ValueError, match=message):
        adapt.apply(model, method, targets=NAMES, progress=False, **params)
    assert not factored_layers(model)
