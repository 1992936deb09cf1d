import pytest
import torch

from slimtune.weights.hessian import (add_damping, damped_hessian, fix_dead, inverse_cholesky,
                                      layer_hessian)
from slimtune.weights.obs import gptq, hessian_factor, sparsegpt
from slimtune.weights.quant import QuantSpec, dequantize, quantize, round_to_nearest
from slimtune.weights.sparsity import (layer_mask, magnitude_scores, nm_mask, parse_pattern,
                                       prune_lowest, row_mask, wanda_scores)


def _w(out=48, inp=128, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _loss(W, W_hat, H):
    D = (W - W_hat).double()
    return float(torch.trace(D @ H.double() @ D.T))


# --- sparsity ---------------------------------------------------------------------------------

def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("4:8") == (4, 8)
    assert parse_pattern("unstructured") is None
    for bad in ("4:2", "2:2", "a:b", "2-4", "0:4", ""):
        with pytest.raises(ValueError, match="N:M"):
            parse_pattern(bad)


def test_mask_counts():
    S = _w(8, 64).abs()
    m = nm_mask(S, 2, 4)
    assert (m.reshape(8, 16, 4).sum(-1) == 2).all()
    assert (nm_mask(S, 4, 8).reshape(8, 8, 8).sum(-1) == 4).all()
    assert (row_mask(S, 0.3).sum(1) == 64 - 19).all()
    assert int(layer_mask(S, 0.3).sum()) == 512 - 153
    kept = S[layer_mask(S, 0.5)]
    assert kept.min() >= S[~layer_mask(S, 0.5)].max()
    with pytest.raises(ValueError, match="divide"):
        nm_mask(S[:, :62], 2, 4)
    ties = torch.ones(1, 8)  # stable: the earlier columns are kept
    assert nm_mask(ties, 2, 4).tolist() == [[True, True, False, False] * 2]
    assert row_mask(ties, 0.25).tolist() == [[True] * 6 + [False] * 2]


def test_prune_lowest_selects_as_the_stable_sort():
    g = torch.Generator().manual_seed(0)
    for shape in ((7, 13), (64, 128)):
        for S in (torch.randint(0, 5, shape, generator=g).float(), torch.rand(shape, generator=g)):
            order = torch.sort(S.reshape(-1), descending=True, stable=True).indices
            for k in (0, 1, 17, S.numel() // 2, S.numel() - 1, S.numel()):
                ref = torch.zeros(S.numel(), dtype=torch.bool)
                ref[order[:S.numel() - k]] = True
                assert torch.equal(prune_lowest(S, k), ref.reshape(shape)), (shape, k)


# --- hessian ----------------------------------------------------------------------------------

def test_inverse_cholesky_factor_and_dead():
    X = torch.randn(200, 16, dtype=torch.float64)
    X[:, 3] = 0
    G = X.T @ X
    H = layer_hessian(G, 200)
    U, used = inverse_cholesky(H, damp=0.01)
    assert used == 0.01
    assert torch.equal(U, torch.triu(U))
    Hd = damped_hessian(G, 200, 0.01)
    assert Hd[3, 3] > 1 and (Hd[3, :3] == 0).all()
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), rtol=1e-8, atol=1e-10)
    assert torch.allclose(Hd, add_damping(fix_dead(H)[0], 0.01))


def test_inverse_cholesky_raises_damping_on_singular():
    X = _w(4, 64).double()  # rank 4 of 64: the first try (1e-16) fails, the second succeeds
    H = layer_hessian(X.T @ X, 4)
    U, used = inverse_cholesky(H, damp=1e-16, growth=1e8)
    assert used == pytest.approx(1e-8) and torch.equal(U, torch.triu(U))
    Hd = add_damping(H, used)
    assert torch.allclose(U.T @ U @ Hd, torch.eye(64, dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="Cholesky of the Hessian failed even with damping"):
        inverse_cholesky(torch.ones(8, 8, dtype=torch.float64), damp=0.0)


def test_inverse_cholesky_nan():
    H = torch.eye(8, dtype=torch.float64)
    H[2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        inverse_cholesky(H)


# --- identity Hessian: GPTQ = RTN, SparseGPT = magnitude --------------------------------------

@pytest.mark.parametrize("bits,group,sym", [(4, None, True), (3, None, False), (4, 32, True),
                                            (3, 64, False), (2, 32, False)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_identity_is_rtn(bits, group, sym, act_order):
    W = _w()
    spec = QuantSpec(bits, group, sym)
    # a diagonal H with unequal entries makes act_order permute for real (still no coupling)
    H = torch.diag(1.0 + torch.arange(128) % 5) if act_order else torch.eye(128)
    res = gptq(W, H, spec, block_size=32, act_order=act_order, damp=0.1)
    q_rtn, grid = round_to_nearest(W, spec)
    assert torch.equal(res.q, q_rtn)
    assert torch.equal(res.weight, dequantize(q_rtn, grid))
    assert res.q.dtype == torch.int32 and res.weight.dtype == torch.float32


def test_gptq_error_is_damped_calibration_loss():
    X = torch.randn(300, 64, dtype=torch.float64)
    H = layer_hessian(X.T @ X, 300)
    W = _w(16, 64).double()
    res = gptq(W, H, QuantSpec(3, 16), block_size=16, act_order=True)
    Hd = add_damping(H, res.damp_used)
    assert res.error == pytest.approx(_loss(W, res.weight, Hd) / 2, rel=1e-9)


@pytest.mark.parametrize("s", [0.5, 0.3])
def test_sparsegpt_identity_is_magnitude(s):
    W = _w()
    res = sparsegpt(W, torch.eye(128), s, block_size=128)
    assert torch.equal(res.mask, layer_mask(magnitude_scores(W), s))
    assert torch.equal(res.weight, W * res.mask)
    res = sparsegpt(W, torch.eye(128), None, pattern=(2, 4), block_size=128)
    assert torch.equal(res.mask, nm_mask(W.abs(), 2, 4))
    assert torch.equal(res.weight, W * res.mask)


def test_sparsegpt_exact_counts_and_zeros():
    X = torch.randn(300, 96, dtype=torch.float64)
    H = layer_hessian(X.T @ X, 300)
    W = _w(10, 96).double()
    res = sparsegpt(W, H, 0.37, block_size=40)  # uneven blocks
    assert int((~res.mask).sum()) == int(0.37 * 960)
    assert (res.weight[~res.mask] == 0).all() and (res.weight[res.mask] != 0).all()
    assert res.error == pytest.approx(_loss(W, res.weight, add_damping(H, res.damp_used)) / 2,
                                      rel=1e-9)
    res = sparsegpt(W, H, 0.5, pattern=(2, 4), block_size=32)
    assert (res.mask.reshape(10, 24, 4).sum(-1) == 2).all()
    assert (res.weight[~res.mask] == 0).all()
    with pytest.raises(ValueError, match="contradicts"):
        sparsegpt(W, H, 0.25, pattern=(2, 4), block_size=32)


def test_a_shared_factor_gives_the_same_result():
    X = torch.randn(300, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    H = layer_hessian(X.T @ X, 300)
    f = hessian_factor(H, 0.01, act_order=True)
    for W in (_w(16, 64), _w(8, 64, seed=1)):  # two layers of one input, e.g. k and v
        alone = gptq(W, H, QuantSpec(3, 16), block_size=16, act_order=True)
        shared = gptq(W, f.H, QuantSpec(3, 16), block_size=16, act_order=True, factor=f)
        assert torch.equal(alone.q, shared.q) and alone.error == shared.error
    with pytest.raises(ValueError, match="act_order"):
        gptq(W, H, QuantSpec(3, 16), act_order=False, factor=f)
    natural = hessian_factor(H, 0.01)
    alone, shared = sparsegpt(W, H, 0.5), sparsegpt(W, H, 0.5, factor=natural)
    assert torch.equal(alone.mask, shared.mask) and torch.equal(alone.weight, shared.weight)


# --- a real layer -----------------------------------------------------------------------------

TEXT = ("The committee met on Tuesday to discuss the new budget for the public library. "
        "Several members argued that the reading rooms needed longer opening hours, while "
        "others wanted to spend the money on repairing the roof before winter arrived. ")


@pytest.fixture(scope="module")
def real_layer(smollm2):
    model, tok = smollm2
    ids = torch.tensor(tok(TEXT)["input_ids"])
    ids = ids.repeat(600 // len(ids) + 1)[:600]
    layer = model.model.layers[0]
    with torch.no_grad():
        X = layer.input_layernorm(model.model.embed_tokens(ids[None]))[0].double()
        W = layer.self_attn.q_proj.weight.detach().clone()
    assert X.shape == (600, 576)
    G = X.T @ X
    return W, G, layer_hessian(G, 600)


def test_real_layer_gptq_and_sparsegpt(real_layer):
    W, G, H = real_layer
    for spec in (QuantSpec(3, 64, False), QuantSpec(4, None, True)):
        q_rtn, grid = round_to_nearest(W, spec)
        rtn = _loss(W, dequantize(q_rtn, grid), H)
        for act_order in (False, True):
            res = gptq(W, H, spec, act_order=act_order)
            assert _loss(W, res.weight, H) < rtn
            assert torch.equal(quantize(res.weight, res.grid), res.q)
            assert torch.equal(res.grid.scale, grid.scale)  # grid fixed from the original W
    res = sparsegpt(W, H, 0.5)
    assert int((~res.mask).sum()) == W.numel() // 2
    mag = W * layer_mask(magnitude_scores(W), 0.5)
    wanda = W * row_mask(wanda_scores(W, torch.diagonal(G).sqrt()), 0.5)
    sgpt = _loss(W, res.weight, H)
    assert sgpt < _loss(W, mag, H) and sgpt < _loss(W, wanda, H)


def test_real_layer_float32_sweep_matches_float64(real_layer):
    """The sweep runs in the weight's precision: float32 (as the reference codes) lands on the
    same grid points as float64 almost everywhere, at the same calibration loss."""
    W, G, H = real_layer
    spec = QuantSpec(4, None, True)
    r32, r64 = gptq(W, H, spec, act_order=True), gptq(W.double(), H, spec, act_order=True)
    assert r32.weight.dtype == torch.float32 and r64.weight.dtype == torch.float64
    assert (r32.q == r64.q).float().mean() > 0.99
    l32, l64 = _loss(W, r32.weight, H), _loss(W, r64.weight, H)
    assert l32 == pytest.approx(l64, rel=0.01)
    s32, s64 = sparsegpt(W, H, 0.5), sparsegpt(W.double(), H, 0.5)
    assert (s32.mask == s64.mask).float().mean() > 0.99
    assert _loss(W, s32.weight, H) == pytest.approx(_loss(W, s64.weight, H), rel=0.01)


def test_real_layer_inverse_cholesky_equals_the_gptq_reference_formula(real_layer):
    """One Cholesky of the reversed H and a triangular inverse give the factor of GPTQ's
    reference, ``cholesky(cholesky_inverse(cholesky(H_d)), upper=True)``: equal to rounding at
    the default damping, and at least as accurate an inverse when H_d is ill-conditioned."""
    _, _, H = real_layer
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    for damp in (0.01, 1e-4):
        U, used = inverse_cholesky(H, damp=damp)
        Hd = add_damping(fix_dead(H)[0], used)
        ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
        assert torch.equal(U, torch.triu(U)) and (torch.diagonal(U) > 0).all()
        rel = float((U - ref).abs().max() / ref.abs().max())
        assert rel < (1e-12 if damp == 0.01 else 1e-9), (damp, rel)
        residual = float((U.T @ U @ Hd - eye).abs().max())
        assert residual <= 1.5 * float((ref.T @ ref @ Hd - eye).abs().max()), damp
