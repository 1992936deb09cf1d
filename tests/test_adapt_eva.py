"""EVA (Paischer et al. 2024) on SmolLM2-135M cut to 3 blocks: ranks fill the budget within the
cap, components are the top eigenvectors of each layer's input covariance, the start is exactly the
base model, converged layers stop being fed, validation. Helpers and fixtures (``smol3``,
``calib``, ``inputs``, ...) come from test_adapt_data.py; parity with PEFT's ``eva`` is in
test_adapt_data_peft.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimtune.adapt as adapt
from slimtune.adapt import eva
from slimtune.adapt.registry import make_config
from slimtune.layers import FactoredLinear
from slimtune.targets import match_targets
from test_adapt_data import (FEW, LAYER, R, base_logits, batch_pca, calib,  # noqa: F401
                             inputs, logits, smol3, subspace_gap, text_ids)

# -- EVA -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eva_few(smol3, calib):
    """EVA prepared on the FEW layers, exact SVDs, one window per batch, tau = 1 (no component is
    ever exactly unchanged, so no layer converges and every group sees all 4 batches)."""
    names = match_targets(smol3, FEW)
    config = make_config("eva", r=R, targets=FEW, svd="exact", tau=1.0, batch_size=1)
    with pytest.warns(RuntimeWarning, match="did not converge") as caught:
        prepared = eva.prepare(smol3, names, config, calib)
    return names, config, prepared, str(caught[0].message)


def groups(names):
    """{block prefix: [q_proj, v_proj]} (the two share their input)."""
    out = {}
    for n in names:
        out.setdefault(n.rsplit(".", 1)[0], []).append(n)
    return out


def test_eva_ranks_fill_the_budget_within_the_cap(eva_few):
    names, config, prepared, _ = eva_few
    ranks = {n: prepared[n].A.shape[0] for n in names}
    assert sum(ranks.values()) == R * len(names)
    assert all(0 <= r <= config.max_rank for r in ranks.values())
    assert len(set(ranks.values())) > 1  # the budget was actually redistributed
    picked = torch.cat([prepared[n].explained_variance_ratio[:ranks[n]] for n in names])
    rest = torch.cat([prepared[n].explained_variance_ratio[ranks[n]:] for n in names])
    assert picked.min() >= rest.max()
    for q, v in groups(names).values():  # shared input: one PCA, a prefix each
        k = min(ranks[q], ranks[v])
        assert torch.equal(prepared[q].A[:k], prepared[v].A[:k])
        assert torch.equal(prepared[q].explained_variance_ratio,
                           prepared[v].explained_variance_ratio)


def test_eva_components_are_top_eigenvectors_of_the_input_covariance(eva_few, inputs):
    """A's rows vs the top eigenvectors of the centred covariance of the same 512 input rows
    (a plain hooked forward). The incremental PCA keeps only k = 8 components between batches of
    128 rows, so it is not exact: measured gaps (sin of the largest principal angle) on these
    layers are <= 0.011 for the top-2 subspace and <= 0.031 for all assigned components, and
    the explained-variance ratios of the top 4 are within 0.5%."""
    names, config, prepared, _ = eva_few
    for q, v in groups(names).values():
        lead = max((q, v), key=lambda n: prepared[n].A.shape[0])
        A = prepared[lead].A.double()
        V, ratios = batch_pca(inputs[lead], config.max_rank)
        assert subspace_gap(A[:2], V[:2]) < 0.02
        assert subspace_gap(A, V[:len(A)]) < 0.06
        assert torch.allclose(prepared[lead].explained_variance_ratio[:4], ratios[:4], rtol=0.01)


def test_eva_start_is_exactly_the_base_model(eva_few, smol3, calib, base_logits, text_ids):
    names, config, prepared, _ = eva_few
    model = copy.deepcopy(smol3)
    with pytest.warns(RuntimeWarning):
        adapt.apply(model, "eva", r=R, targets=FEW, calib=calib, svd="exact", tau=1.0,
                    batch_size=1, progress=False)
    assert torch.equal(logits(model, text_ids), base_logits)
    for name in names:
        layer, rank = model.get_submodule(name), prepared[name].A.shape[0]
        if rank == 0:
            assert type(layer) is nn.Linear
            continue
        assert isinstance(layer, FactoredLinear) and layer.lowrank.rank == rank
        assert not layer.lowrank.B.any() and layer.origin is None
        assert torch.equal(layer.lowrank.A, prepared[name].A)
        assert layer.lowrank.scale == config.alpha / R  # adjust_scaling_factors
        assert layer.base.weight.data_ptr() == smol3.get_submodule(name).weight.data_ptr() \
            or torch.equal(layer.base.weight, smol3.get_submodule(name).weight)


def test_eva_layer_scale_and_rank_zero(smol3):
    """PEFT's rule: adjust_scaling_factors sets alpha_i = alpha·rank_i/r, so s = alpha/r (rslora:
    alpha·sqrt(rank_i)/r); without it s = alpha/rank_i. Rank 0 keeps the plain linear."""
    linear = smol3.get_submodule(LAYER)
    A = torch.randn(6, linear.in_features)
    init = eva.EvaInit(A, True, 1, torch.ones(8))
    for kw, expected in [({}, 32 / R), ({"adjust_scaling_factors": False}, 32 / 6),
                         ({"rslora": True}, 32 * 6 ** 0.5 / R),
                         ({"rslora": True, "adjust_scaling_factors": False}, 32 / 6 ** 0.5)]:
        layer = eva.init_layer(LAYER, linear, make_config("eva", r=R, alpha=32, **kw), init)
        assert layer.lowrank.rank == 6 and abs(layer.lowrank.scale - expected) < 1e-12
    empty = eva.EvaInit(A[:0], True, 1, torch.ones(8))
    assert eva.init_layer(LAYER, linear, make_config("eva", r=R), empty) is linear


def test_eva_stops_feeding_converged_layers(smol3, calib):
    """Four copies of one window: the second identical batch leaves the top-k subspace unchanged,
    so every layer converges after two batches and no third batch is fed."""
    import warnings

    names = match_targets(smol3, FEW)
    config = make_config("eva", r=R, targets=FEW, svd="exact", batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        prepared = eva.prepare(smol3, names, config, calib[:1].repeat(4, 1))
    assert all(p.converged and p.batches == 2 for p in prepared.values())


def test_eva_reports_layers_that_never_converge(eva_few):
    names, _, prepared, message = eva_few
    late = [n for n in names if not prepared[n].converged]
    assert late and all(prepared[n].A.shape[0] > 0 for n in late)
    assert all(prepared[n].batches == 4 for n in names)
    assert f"{len(late)} of {len(names)} layers did not converge" in message


def test_eva_validates(smol3, calib):
    with pytest.raises(ValueError, match="rho"):
        make_config("eva", rho=0.5)
    with pytest.raises(ValueError, match="exceed in_features"):
        adapt.apply(copy.deepcopy(smol3), "eva", r=400, targets=[LAYER], calib=calib)
