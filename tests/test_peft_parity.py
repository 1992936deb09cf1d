"""Parity with Hugging Face PEFT on SmolLM2-135M (targets q_proj, v_proj):

- initialisation: our adapter and PEFT's, built from the same base (and calibration data), give the
  same base weights, updates and -- after the same non-zero change to both -- the same logits;
- export (test_peft_export.py, which shares this file's helpers and fixtures):
  ``slimtune.adapt.to_peft`` round trips through ``peft.PeftModel.from_pretrained``.

Relative error = max |ours - theirs| / max |theirs|; the bar is 1e-4 everywhere.

The fast tests run on SmolLM2 cut to its first 3 decoder blocks (real weights, 6 adapted layers:
every comparison is per layer, and copying or running the 30-block model dominates the time);
the slow ones export every method from the whole model.
"""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from real_layers import first_blocks  # noqa: E402
from slimtune import adapt  # noqa: E402
from slimtune.targets import factored_layers  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
BLOCKS = 3
R, ALPHA = 8, 16.0
TOL = 1e-4


# -- helpers ---------------------------------------------------------------------------------
def need(method: str) -> None:
    assert method in adapt.known_methods(), f"adapter method {method!r} is not registered"


def rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).detach().abs().max() / theirs.detach().abs().max())


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def ours(base, method, calib=None, alpha=ALPHA, **params):
    return adapt.apply(copy.deepcopy(base), method, r=R, alpha=alpha, targets=TARGETS, calib=calib,
                       progress=False, **params)


def theirs(base, **config):
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, **config)
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def layer_pairs(model, peft_model):
    """``(name, our FactoredLinear, PEFT lora.Linear)`` for every adapted layer."""
    inner = peft_model.base_model.model
    theirs_names = [n for n, m in inner.named_modules() if hasattr(m, "lora_A")]
    pairs = [(n, layer, inner.get_submodule(n)) for n, layer in factored_layers(model).items()]
    assert [n for n, _, _ in pairs] == theirs_names and len(pairs) > 0
    return pairs


def peft_delta(layer) -> torch.Tensor:
    return layer.get_delta_weight("default")


def align_signs(B_ours, A_ours, B_peft):
    """Flip our singular pairs to PEFT's sign (B·A is unchanged by flipping a column of B and
    the matching row of A)."""
    signs = torch.sign((B_ours * B_peft).sum(0))
    return B_ours * signs, A_ours * signs[:, None]


@torch.no_grad()
def scale_components(pairs, seed=0):
    """The same change in both models: component i of every layer's update times (1 + e_i).
    Invariant to per-component signs and to a scalar moved between A and B."""
    g = torch.Generator().manual_seed(seed)
    for _, mine, other in pairs:
        e = 1 + 0.5 * (2 * torch.rand(R, generator=g) - 1)
        mine.lowrank.B.mul_(e)
        other.lora_B["default"].weight.mul_(e)


@torch.no_grad()
def perturb(model, seed=0):
    """Simulate training: add noise to every trainable parameter."""
    g = torch.Generator().manual_seed(seed)
    for p in adapt.trainable_parameters(model).values():
        p.add_(torch.randn(p.shape, generator=g) * (0.05 * p.abs().mean() + 0.01))


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full(smollm2):
    return smollm2[0]


@pytest.fixture(scope="module")
def base(smollm2):
    """SmolLM2 with only its first ``BLOCKS`` decoder blocks (a separate copy)."""
    return first_blocks(smollm2[0], BLOCKS)


@pytest.fixture(scope="module")
def ids(smollm2):
    tok = smollm2[1]
    texts = ["The quick brown fox jumps over the lazy dog near the river.",
             "Adapters change a few weights of a large pretrained language model."]
    rows = [tok(t)["input_ids"][:8] for t in texts]
    return torch.tensor(rows, dtype=torch.long)


@pytest.fixture(scope="module")
def base_logits(base, ids):
    return logits(base, ids)


@pytest.fixture(scope="module")
def calib(smollm2):
    from slimtune.calib import calibration_windows

    return calibration_windows(smollm2[1], "ptb", "train", n=1, seqlen=128, seed=0)


# -- initialisation parity -------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lora_matches_peft_with_shared_factors(base, ids, base_logits, rslora):
    mine = ours(base, "lora", rslora=rslora)
    other = theirs(base, use_rslora=rslora)
    pairs = layer_pairs(mine, other)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer, p in pairs:
            assert layer.lowrank.scale == pytest.approx(p.scaling["default"], rel=1e-12), name
            bound = 1 / layer.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, in]
            for A in (layer.lowrank.A, p.lora_A["default"].weight):
                assert 0.9 * bound < A.abs().max() <= bound
            assert not layer.lowrank.B.any() and not p.lora_B["default"].weight.any()
            layer.lowrank.A.copy_(p.lora_A["default"].weight)
            B = 0.05 * torch.randn(layer.lowrank.B.shape, generator=g)
            layer.lowrank.B.copy_(B)
            p.lora_B["default"].weight.copy_(B)
    a, b = logits(mine, ids), logits(other, ids)
    assert rel(a, base_logits) > 1e-3  # the shared B changes the model
    assert rel(a, b) < TOL


def test_dora_magnitude_and_outputs_match_peft(base, ids, base_logits):
    need("dora")
    mine = ours(base, "dora")
    other = theirs(base, use_dora=True)
    pairs = layer_pairs(mine, other)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, layer, p in pairs:
            m_peft = p.lora_magnitude_vector["default"].weight
            assert rel(layer.transform.magnitude, m_peft) < 1e-6, name
            layer.lowrank.A.copy_(p.lora_A["default"].weight)
            B = 0.05 * torch.randn(layer.lowrank.B.shape, generator=g)
            dm = 1 + 0.05 * torch.randn(m_peft.shape, generator=g)
            layer.lowrank.B.copy_(B)
            p.lora_B["default"].weight.copy_(B)
            layer.transform.magnitude.mul_(dm)
            m_peft.mul_(dm)
    a, b = logits(mine, ids), logits(other, ids)
    assert rel(a, base_logits) > 1e-3
    assert rel(a, b) < TOL


def check_base_and_delta(pairs, tol=TOL):
    for name, layer, p in pairs:
        assert rel(layer.base.weight, p.base_layer.weight) < tol, name
        assert rel(layer.lowrank.delta_weight(), peft_delta(p)) < tol, name


def check_logits_after_shared_change(mine, other, pairs, ids, base_logits):
    assert rel(logits(mine, ids), base_logits) < TOL  # exact start
    scale_components(pairs)
    a, b = logits(mine, ids), logits(other, ids)
    assert rel(a, base_logits) > 1e-3
    assert rel(a, b) < TOL


def test_pissa_exact_matches_peft(base, ids, base_logits):
    mine = ours(base, "pissa", svd="exact")
    other = theirs(base, init_lora_weights="pissa")
    pairs = layer_pairs(mine, other)
    check_base_and_delta(pairs)
    for name, layer, p in pairs:  # the factors themselves, up to the sign of each pair
        B, A = align_signs(layer.lowrank.B, layer.lowrank.A, p.lora_B["default"].weight)
        assert rel(B, p.lora_B["default"].weight) < 1e-3, name
        assert rel(A, p.lora_A["default"].weight) < 1e-3, name
    check_logits_after_shared_change(mine, other, pairs, ids, base_logits)


def test_pissa_randomized_vs_peft_niter_4(base, capsys):
    """Both approximate the exact rank-r principal part; measure each one's distance to it and the
    energy it captures. Ours oversamples the sketch by 10 columns (PEFT's ``svd_lowrank`` uses
    exactly r), so it must be at least as close on both counts."""
    torch.manual_seed(0)  # PEFT's svd_lowrank draws from the global generator
    mine = ours(base, "pissa", svd="randomized", niter=4)
    other = theirs(base, init_lora_weights="pissa_niter_4")
    exact = factored_layers(ours(base, "pissa", svd="exact"))
    sq = {"ours": 0.0, "peft": 0.0, "between": 0.0, "exact": 0.0, "e_ours": 0.0, "e_peft": 0.0}
    with torch.no_grad():
        for name, layer, p in layer_pairs(mine, other):
            D = exact[name].lowrank.delta_weight()
            d_ours, d_peft = layer.lowrank.delta_weight(), peft_delta(p)
            sq["ours"] += float((d_ours - D).square().sum())
            sq["peft"] += float((d_peft - D).square().sum())
            sq["between"] += float((d_ours - d_peft).square().sum())
            sq["e_ours"] += float(d_ours.square().sum())
            sq["e_peft"] += float(d_peft.square().sum())
            sq["exact"] += float(D.square().sum())
    err = {k: (sq[k] / sq["exact"]) ** 0.5 for k in ("ours", "peft", "between")}
    energy = {k: sq[f"e_{k}"] / sq["exact"] for k in ("ours", "peft")}
    with capsys.disabled():
        print(f"\npissa randomized (niter=4) vs the exact rank-{R} update: relative "
              f"Frobenius error ours {err['ours']:.3e}, PEFT pissa_niter_4 {err['peft']:.3e}, "
              f"ours vs PEFT {err['between']:.3e}; energy captured ours {energy['ours']:.6f}, "
              f"PEFT {energy['peft']:.6f}")
    assert err["ours"] <= err["peft"]
    assert energy["peft"] <= energy["ours"] <= 1 + 1e-6


def test_olora_matches_peft(base, ids, base_logits):
    need("olora")
    mine = ours(base, "olora")
    other = theirs(base, init_lora_weights="olora")
    pairs = layer_pairs(mine, other)
    check_base_and_delta(pairs)
    check_logits_after_shared_change(mine, other, pairs, ids, base_logits)


def peft_corda(monkeypatch):
    """PEFT's ``preprocess_corda`` and ``CordaConfig``."""
    # PEFT 0.21.2's corda.py imports attrs, which PEFT does not declare: our test extra has it
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    return preprocess_corda, CordaConfig


def corda_peft_model(base, monkeypatch, run_model=None, cache_file=None):
    preprocess_corda, CordaConfig = peft_corda(monkeypatch)
    corda = CordaConfig(corda_method="ipm", cache_file=None if cache_file is None else str(cache_file))
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                             init_lora_weights="corda", corda_config=corda)
    model = copy.deepcopy(base)
    preprocess_corda(model, config, run_model=None if run_model is None else
                     lambda: run_model(model))
    return peft.get_peft_model(model, config).eval()


def test_corda_init_matches_peft_given_the_same_decomposition(base, ids, base_logits, calib,
                                                              monkeypatch, tmp_path):
    """Our context decomposition (U, S, V of each layer) handed to PEFT through its CorDA cache
    file: PEFT's split, scale and residual base then equal ours."""
    need("corda")
    from slimtune.adapt import corda

    mine = ours(base, "corda", calib=calib, mode="ipm")
    names = list(factored_layers(mine))
    config = adapt.adapter_config(mine)
    factors = corda.prepare(copy.deepcopy(base), names, config, calib)
    cache = {}
    for name, f in factors.items():
        cache.update({f"{name}.eigens.S_WC": f.S, f"{name}.eigens.U_WC": f.U,
                      f"{name}.eigens.V_WC": f.V})
    torch.save(cache, tmp_path / "corda_cache.pt")
    other = corda_peft_model(base, monkeypatch, cache_file=tmp_path / "corda_cache.pt")
    pairs = layer_pairs(mine, other)
    check_base_and_delta(pairs)
    check_logits_after_shared_change(mine, other, pairs, ids, base_logits)


def test_corda_end_to_end_close_to_peft(base, ids, base_logits, calib, monkeypatch, capsys):
    """PEFT computing the covariances itself (one window; it normalises each forward's inputs by
    their max, a uniform scale the base and s·B·A do not depend on). Float32 CorDA amplifies
    round-off: W·C_d is decomposed and C_d⁻¹ applied with C_d near-singular (128 tokens, 576
    inputs), and each float32 run is ~0.3-1% off a float64 one, so the bar is 5%, not 1e-4."""
    need("corda")
    mine = ours(base, "corda", calib=calib, mode="ipm")
    other = corda_peft_model(base, monkeypatch,
                             run_model=lambda model: model.model(input_ids=calib, use_cache=False))
    pairs = layer_pairs(mine, other)
    base_err = max(rel(layer.base.weight, p.base_layer.weight) for _, layer, p in pairs)
    delta_err = max(rel(layer.lowrank.delta_weight(), peft_delta(p)) for _, layer, p in pairs)
    assert rel(logits(mine, ids), base_logits) < TOL
    scale_components(pairs)
    a, b = logits(mine, ids), logits(other, ids)
    with capsys.disabled():
        print(f"\ncorda ipm vs PEFT end to end (float32, 1 window of {calib.shape[1]} tokens): "
              f"max relative difference of base {base_err:.2e}, of s·B·A {delta_err:.2e}, of "
              f"logits after the shared change {rel(a, b):.2e}")
    assert delta_err < 5e-2 and base_err < 5e-2 and rel(a, b) < 5e-2
    assert rel(a, base_logits) > 10 * rel(a, b)  # the change is far above the disagreement


def test_eva_matches_peft(base, ids, base_logits, calib, capsys):
    """All linears of the 3 blocks; one calibration window, cycled until the components converge
    (PEFT cycles its dataloader the same way). PEFT's incremental PCA uses a randomized SVD, ours here the exact one: the
    rank distribution and scales must agree and the components nearly so; then the same A (PEFT's)
    and the same non-zero B in both give the same logits."""
    need("eva")
    from peft import EvaConfig, initialize_lora_eva_weights

    mine = adapt.apply(copy.deepcopy(base), "eva", r=R, alpha=ALPHA, targets="all-linear",
                       calib=calib, progress=False, batch_size=1, passes=8, svd="exact")
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                             init_lora_weights="eva",
                             eva_config=EvaConfig(rho=2.0, tau=0.99))
    other = peft.get_peft_model(copy.deepcopy(base), config, low_cpu_mem_usage=True).eval()
    initialize_lora_eva_weights(other, dataloader=[{"input_ids": calib}], show_progress_bar=False)
    pairs = layer_pairs(mine, other)
    ranks = {n: layer.lowrank.rank for n, layer, _ in pairs}
    assert ranks == {n: p.r["default"] for n, _, p in pairs}
    assert len(set(ranks.values())) > 1  # EVA redistributed the ranks
    cosines = []
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, layer, p in pairs:
            assert layer.lowrank.scale == pytest.approx(p.scaling["default"], rel=1e-9), name
            A_peft = p.lora_A["default"].weight
            cosines.append(torch.nn.functional.cosine_similarity(layer.lowrank.A, A_peft).abs())
            layer.lowrank.A.copy_(A_peft)
            B = 0.05 * torch.randn(layer.lowrank.B.shape, generator=g)
            layer.lowrank.B.copy_(B)
            p.lora_B["default"].weight.copy_(B)
    cosines = torch.cat(cosines)
    with capsys.disabled():
        print(f"\neva (ours exact SVD) vs PEFT (randomized) over {len(pairs)} layers, ranks "
              f"{min(ranks.values())}-{max(ranks.values())}: |cos| of matching components median "
              f"{float(cosines.median()):.6f}, min {float(cosines.min()):.4f}")
    assert float(cosines.median()) > 0.999 and float(cosines.min()) > 0.9
    a, b = logits(mine, ids), logits(other, ids)
    assert rel(a, base_logits) > 1e-3
    assert rel(a, b) < TOL
