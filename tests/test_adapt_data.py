"""The data-driven adapter inits CorDA and EVA, on SmolLM2-135M with PTB-train calibration windows,
and their pure math (damped inverse, covariance SVD, incremental PCA) on tiny synthetic tensors;
parity with PEFT's ``corda`` and ``eva`` inits is in test_adapt_data_peft.py.

Most real-model tests use SmolLM2 cut to its first 3 blocks (``smol3``: real weights and data at a
tenth of the cost; the calibration pipeline walks every block) and adapt its q/v projections
(``FEW``) with 4 × 128 windows; the slow tests repeat the PEFT parity on the full model.
"""
from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn

import slimtune.adapt as adapt
import slimtune.calib.blocks
from slimtune.adapt import corda, eva
from slimtune.adapt.registry import make_config
from slimtune.layers import FactoredLinear
from slimtune.calib import calibration_windows
from slimtune.targets import match_targets
from slimtune.weights.covariance import covariance_svd, damped_inverse
from slimtune.weights.incremental import IncrementalPCA, fix_component_signs
from slimtune.weights.stats import InputStatistics
from slimtune.weights.svd import balanced_split

R = 4
FEW = r"model\.layers\.[0-2]\.self_attn\.(q|v)_proj"
LAYER = "model.layers.1.self_attn.q_proj"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def fro_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def projector(rows: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the row space of ``rows`` [k, n]."""
    Q, _ = torch.linalg.qr(rows.double().mT)
    return Q @ Q.mT


def subspace_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spectral norm of the difference of the projectors onto the row spaces (sin of the largest
    principal angle; 0 = same subspace, 1 = some direction orthogonal)."""
    return float(torch.linalg.matrix_norm(projector(a) - projector(b), ord=2))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def layer_inputs(model: nn.Module, names, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every input row [tokens, in] of each named layer in one ordinary hooked forward."""
    rows, handles = {n: [] for n in names}, []
    for n in names:
        hook = (lambda n: lambda m, a: rows[n].append(a[0].reshape(-1, a[0].shape[-1]).double()))(n)
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    try:
        model(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib(smollm2):
    """4 × 128 PTB-train windows."""
    return calibration_windows(smollm2[1], "ptb", "train", n=4, seqlen=128, seed=0)


@pytest.fixture(scope="module")
def smol3(smollm2):
    """SmolLM2-135M cut to its first 3 blocks (a copy)."""
    model = copy.deepcopy(smollm2[0])
    model.model.layers = model.model.layers[:3]
    model.config.num_hidden_layers = 3
    return model


@pytest.fixture(scope="module")
def text_ids(ptb_test_ids):
    return ptb_test_ids[:24].unsqueeze(0)


@pytest.fixture(scope="module")
def base_logits(smol3, text_ids):
    return logits(smol3, text_ids)


@pytest.fixture(scope="module")
def inputs(smol3, calib):
    """The calibration input rows of the FEW layers, from a plain hooked forward."""
    model = smol3
    return layer_inputs(model, match_targets(model, FEW), calib)


@pytest.fixture(scope="module")
def corda_adapted(smol3, calib):
    """``get(mode, precision)``: smol3 with corda on FEW, built on first use."""
    cache = {}

    def get(mode, precision="float32"):
        if (mode, precision) not in cache:
            cache[mode, precision] = adapt.apply(copy.deepcopy(smol3), "corda", r=R, targets=FEW,
                                                 calib=calib, mode=mode, precision=precision,
                                                 progress=False)
        return cache[mode, precision]
    return get


# -- pure math -----------------------------------------------------------------------------------
def test_damped_inverse_doubles_until_the_criterion_holds():
    """A rank-8 float32 C: the default tolerance 0.05 holds at the first level (0.01); a strict
    tolerance forces doublings, and the result is the first level that meets it."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 64, generator=g)  # 8 tokens, 64 features: C has rank 8
    C = X.mT @ X / 8
    eye = torch.eye(64)

    def error(lam):
        C_d = C + lam * C.diagonal().mean() * eye
        return float(torch.linalg.matrix_norm(C_d @ torch.linalg.inv(C_d) - eye))

    assert damped_inverse(C)[2] == 0.01
    tol = 1e-4
    C_d, C_inv, lam = damped_inverse(C, tol=tol)
    assert lam > 0.01 and float(torch.log2(torch.tensor(lam / 0.01))).is_integer()
    assert torch.allclose(C_d, C + lam * C.diagonal().mean() * eye)
    assert float(torch.linalg.matrix_norm(C_d @ C_inv - eye)) < tol <= error(lam / 2)
    with pytest.raises(ValueError, match="square"):
        damped_inverse(torch.ones(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        damped_inverse(torch.full((3, 3), float("nan")))


def test_covariance_svd_reconstructs_w():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 20, generator=g, dtype=torch.float64)
    X = torch.randn(50, 20, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 20)
    C_d, C_inv, _ = damped_inverse(X.mT @ X / 50)
    U, S, V = covariance_svd(W, C_d, C_inv)
    assert U.shape == (12, 12) and S.shape == (12,) and V.shape == (20, 12)
    assert fro_rel((U * S) @ V.mT, W) < 1e-10
    assert bool((S[:-1] >= S[1:]).all())


def batch_pca(X: torch.Tensor, k: int):
    Xc = X - X.mean(0)
    evals, evecs = torch.linalg.eigh(Xc.mT @ Xc)
    return evecs.flip(1)[:, :k].mT, evals.flip(0)[:k] / evals.sum()


def test_incremental_pca_without_truncation_is_exact():
    g = torch.Generator().manual_seed(2)
    d = 24
    X = torch.randn(300, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1, d,
                                                                                dtype=torch.float64)
    X = X + torch.randn(d, generator=g, dtype=torch.float64)  # a non-zero mean
    pca = IncrementalPCA(d, dtype=torch.float64)
    for batch in X.split([3, 50, 97, 150]):  # the first batch is smaller than k
        pca.update(batch)
    V, ratios = batch_pca(X, d)
    assert subspace_gap(pca.components[:5], V[:5]) < 1e-8
    assert torch.allclose(pca.explained_variance_ratio, ratios, atol=1e-12)
    assert torch.allclose(pca.mean, X.mean(0)) and pca.n_seen == 300
    assert bool((pca.components.gather(1, pca.components.abs().argmax(1, keepdim=True)) > 0).all())


def test_incremental_pca_grows_from_small_batches():
    """Two-row batches and k = 6: the first update holds 2 components, later ones grow to 6; the
    centred data has rank 3, so nothing is lost to truncation and the top 3 are exact."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 10, generator=g,
                                                                            dtype=torch.float64)
    pca = IncrementalPCA(6, dtype=torch.float64)
    pca.update(X[:2])
    assert len(pca.components) == 2
    for batch in X[2:].split(2):
        pca.update(batch)
    assert len(pca.components) == 6
    V, ratios = batch_pca(X, 3)
    assert subspace_gap(pca.components[:3], V) < 1e-8
    assert torch.allclose(pca.explained_variance_ratio[:3], ratios, atol=1e-12)


def test_fix_component_signs():
    V = torch.tensor([[0.1, -0.9, 0.2], [0.5, 0.1, -0.3]])
    fixed = fix_component_signs(V)
    assert torch.equal(fixed, torch.tensor([[-0.1, 0.9, -0.2], [0.5, 0.1, -0.3]]))


def test_redistribute_ranks_gives_the_budget_to_the_largest_ratios():
    ratios = {"a": torch.tensor([0.5, 0.3, 0.05]), "b": torch.tensor([0.4, 0.1, 0.02])}
    assert eva.redistribute_ranks(ratios, 3) == {"a": 2, "b": 1}
    g = torch.Generator().manual_seed(4)
    ratios = {str(i): torch.rand(5, generator=g).sort(descending=True).values for i in range(7)}
    ranks = eva.redistribute_ranks(ratios, 14)
    assert sum(ranks.values()) == 14 and all(0 <= r <= 5 for r in ranks.values())
    picked = torch.cat([ratios[n][:ranks[n]] for n in ratios])
    rest = torch.cat([ratios[n][ranks[n]:] for n in ratios])
    assert picked.min() >= rest.max()


# -- CorDA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_start_equals_base_model(mode, corda_adapted, base_logits, text_ids):
    model = corda_adapted(mode)
    layer = model.get_submodule(LAYER)
    assert isinstance(layer, FactoredLinear) and layer.lowrank.rank == R
    assert layer.origin is not None  # the base is W minus the initial product
    assert rel(logits(model, text_ids), base_logits) < 1e-5


@pytest.mark.parametrize("mode,precision", [("ipm", "float32"), ("kpm", "float64")])
def test_corda_adapter_is_the_chosen_context_components(mode, precision, corda_adapted, smol3,
                                                        inputs):
    """The adapter ``s·B·A`` is the top (ipm) or last (kpm) ``r`` components of ``W·C_d =
    U·S·Ĥᵀ`` computed here independently (float64 SVD; ``C`` from an ordinary hooked forward,
    damped in the same precision): after ``·C_d`` its singular values are those ``S``, and its
    column and row spaces are those of ``U_r`` and ``Ĥ_r·C_d⁻¹``. Measured on every FEW layer:
    float32 ipm -- S within 7e-4 relative, gaps 2e-6 (B) and 2e-3 (A: ``C_d⁻¹`` amplifies the
    float32 error); float64 kpm -- 3e-7 and 3e-8."""
    model = corda_adapted(mode, precision)
    for name in match_targets(smol3, FEW):
        layer = model.get_submodule(name)
        W = smol3.get_submodule(name).weight.double()
        X = inputs[name]
        C_d, _, _ = damped_inverse((X.mT @ X / len(X)).to(getattr(torch, precision)))
        C_d = C_d.double()
        U, S, Vh = torch.linalg.svd(W @ C_d, full_matrices=False)
        keep = slice(0, R) if mode == "ipm" else slice(len(S) - R, len(S))
        delta = layer.lowrank.delta_weight().double()
        tol = {"float32": (3e-3, 1e-4, 1e-2), "float64": (1e-5, 1e-6, 1e-6)}[precision]
        assert torch.allclose(torch.linalg.svdvals(delta @ C_d)[:R], S[keep], rtol=tol[0])
        assert subspace_gap(layer.lowrank.B.mT, U[:, keep].mT) < tol[1]
        assert subspace_gap(layer.lowrank.A, Vh[keep] @ torch.linalg.inv(C_d)) < tol[2]


def test_corda_kpm_in_float32_stays_below_the_noise_floor(corda_adapted, smol3, inputs):
    """Default precision (float32, as PEFT): the last components of ``W·C_d`` are ~1e-9..1e-5 of
    the first, below float32 resolution, so their directions are not determined (measured gaps
    to the float64 ones up to 0.95 for q_proj) -- precision: float64 fixes that (test above). What
    holds: the adapter is orthogonal to the top r components (measured 2e-7; to the top half only
    6e-4) and its singular values after ``·C_d`` are at most the r-th smallest ``S`` plus float32
    noise (1e-6 of the largest)."""
    model = corda_adapted("kpm")
    for name in match_targets(smol3, FEW):
        B = model.get_submodule(name).lowrank.B.double()
        delta = model.get_submodule(name).lowrank.delta_weight().double()
        W = smol3.get_submodule(name).weight.double()
        X = inputs[name]
        C_d = damped_inverse((X.mT @ X / len(X)).float())[0].double()
        U, S, _ = torch.linalg.svd(W @ C_d, full_matrices=False)
        assert float((U[:, :R].mT @ B).norm() / B.norm()) < 1e-5  # what ipm would adapt
        assert float(torch.linalg.svdvals(delta @ C_d)[0]) < float(S[-R]) + 1e-6 * float(S[0])


def test_corda_damping_is_the_first_level_meeting_the_criterion(smol3, calib, inputs):
    names = match_targets(smol3, FEW)
    prepared = corda.prepare(copy.deepcopy(smol3), names, make_config("corda", r=R,
                                                                           targets=FEW), calib)
    for name in (names[0], names[-1]):
        X = inputs[name]
        C = (X.mT @ X / len(X)).float()
        _, _, lam = damped_inverse(C)
        assert prepared[name].damping == lam
        eye = torch.eye(len(C))
        C_d = C + lam * C.diagonal().mean() * eye
        assert float(torch.linalg.matrix_norm(C_d @ torch.linalg.inv(C_d) - eye)) < 0.05


def test_corda_top_component_maximises_w_c_v(smol3):
    """A real weight (block-1 q_proj) with synthetic anisotropic inputs: the first ipm component
    mapped back through ``C_d`` (``v = A[0]·C_d / ||.||``) attains ``max_{|v|=1} ||W·C_d·v||`` (the
    top singular value of ``W·C_d``), beats random unit vectors, and beats PiSSA's top direction
    (the top right singular vector of ``W`` alone) by a clear margin."""
    W = smol3.get_submodule(LAYER).weight.detach()
    n = W.shape[1]
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    decay = torch.logspace(1, -2, n, dtype=torch.float64)
    X = (torch.randn(2048, n, generator=g, dtype=torch.float64) * decay) @ Q.mT
    C = X.mT @ X / len(X)
    config = make_config("corda", r=R, precision="float64")
    f = corda.context_factors(W, C, config)
    A, _ = balanced_split(f.U, f.S, f.V.mT, config.scale)
    C_d, _, _ = damped_inverse(C)
    WC = W.double() @ C_d
    v = A[0] @ C_d
    v = v / v.norm()
    top = float(torch.linalg.matrix_norm(WC, ord=2))
    assert abs(float((WC @ v).norm()) - top) < 1e-8 * top
    rand = torch.randn(n, 256, generator=g, dtype=torch.float64)
    assert float((WC @ (rand / rand.norm(dim=0))).norm(dim=0).max()) < top
    pissa_v = torch.linalg.svd(W.double())[2][0]
    assert float((WC @ pissa_v).norm()) < 0.9 * top


def test_corda_scale_of_c_changes_only_the_split(smol3):
    """A uniform scale c of C (PEFT's per-batch max normalisation) leaves U, S·Vᵀ, hence s·B·A and
    the base, unchanged; A scales by c^(-1/2) and B by c^(1/2)."""
    W = smol3.get_submodule(LAYER).weight.detach()
    g = torch.Generator().manual_seed(6)
    X = torch.randn(1024, W.shape[1], generator=g, dtype=torch.float64)
    C = X.mT @ X / len(X)
    config = make_config("corda", r=R, precision="float64")
    a = corda.context_factors(W, C, config)
    b = corda.context_factors(W, 100.0 * C, config)
    Aa, Ba = balanced_split(a.U, a.S, a.V.mT, config.scale)
    Ab, Bb = balanced_split(b.U, b.S, b.V.mT, config.scale)
    assert fro_rel(Bb @ Ab, Ba @ Aa) < 1e-10
    assert fro_rel(Ab, Aa / 10) < 1e-10 and fro_rel(Bb, Ba * 10) < 1e-10


def test_corda_holds_one_blocks_statistics_at_a_time(smol3, calib, monkeypatch):
    """Every InputStatistics made while CorDA prepares all linears of blocks 0-1 is tracked: there
    are 4 distinct inputs per block (q/k/v and gate/up share theirs), 8 in all, and never more
    than one block's 4 are alive at once. The kept factors are rank-r only."""
    live, made = weakref.WeakSet(), []

    class Tracked(InputStatistics):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            live.add(self)
            made.append(len(live))

    monkeypatch.setattr(slimtune.calib.blocks, "InputStatistics", Tracked)
    monkeypatch.setattr(corda, "InputStatistics", Tracked)
    model = copy.deepcopy(smol3)
    targets = r"model\.layers\.[01]\..*"
    names = match_targets(model, targets)
    assert len(names) == 14
    prepared = corda.prepare(model, names, make_config("corda", r=R, targets=targets), calib[:2])
    assert len(made) == 8 and max(made) <= 4
    assert sorted(prepared) == sorted(names)
    for name, f in prepared.items():
        out, n_in = model.get_submodule(name).weight.shape
        assert f.U.shape == (out, R) and f.S.shape == (R,) and f.V.shape == (n_in, R)


def test_corda_validates_rank(smol3, calib):
    with pytest.raises(ValueError, match="exceeds min"):
        adapt.apply(copy.deepcopy(smol3), "corda", r=1000, targets=[LAYER], calib=calib)
    with pytest.raises(ValueError, match="calib"):
        adapt.apply(copy.deepcopy(smol3), "corda", r=R, targets=[LAYER])
    with pytest.raises(ValueError, match="mode"):
        make_config("corda", mode="bogus")
