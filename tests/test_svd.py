import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtune.weights.svd import (
    effective_rank,
    energy_kept,
    gram_svd,
    randomized_svd,
    rank_for_energy,
    rank_for_ratio,
    scaled_svd,
    stable_rank,
    truncated_svd,
    whitening_factor,
)


def reconstruct(U, S, Vh):
    return (U * S) @ Vh


def matrix_with_spectrum(m, n, singular_values, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=dtype))
    return (U * torch.as_tensor(singular_values, dtype=dtype)) @ V.mT


def decaying_matrix(m=120, n=80, decay=0.7, dtype=torch.float64):
    return matrix_with_spectrum(m, n, [decay**i for i in range(min(m, n))], dtype=dtype)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 40), n=st.integers(2, 40), data=st.data())
def test_truncated_svd_error_is_eckart_young(m, n, data):
    r = data.draw(st.integers(1, min(m, n)))
    seed = data.draw(st.integers(0, 2**16))
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    U, S, Vh = truncated_svd(W, r)
    assert U.shape == (m, r) and S.shape == (r,) and Vh.shape == (r, n)
    all_sv = torch.linalg.svdvals(W)
    expected = all_sv[r:].square().sum().sqrt()
    error = torch.linalg.matrix_norm(W - reconstruct(U, S, Vh))
    assert torch.isclose(error, expected, rtol=1e-8, atol=1e-10)
    # sign convention: the largest-|.| entry of each left singular vector is positive
    peaks = U.gather(0, U.abs().argmax(0, keepdim=True))
    assert bool((peaks > 0).all())


def test_truncated_svd_dtypes_and_validation():
    W16 = torch.randn(8, 6).to(torch.bfloat16)
    U, S, Vh = truncated_svd(W16, 3)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert truncated_svd(torch.randn(8, 6, dtype=torch.float64), 3)[0].dtype == torch.float64
    for bad_r in (0, 7, 2.0, True):
        with pytest.raises(ValueError):
            truncated_svd(torch.randn(8, 6), bad_r)
    with pytest.raises(ValueError):
        truncated_svd(torch.randn(2, 3, 4), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randomized_matches_exact_on_decaying_spectrum(dtype):
    W = decaying_matrix(dtype=dtype)
    r = 10
    U_e, S_e, Vh_e = truncated_svd(W, r)
    U_r, S_r, Vh_r = randomized_svd(W, r)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(S_r, S_e, rtol=tol, atol=tol)
    # same sign convention, so the factors themselves agree
    torch.testing.assert_close(U_r, U_e, rtol=0, atol=100 * tol)
    torch.testing.assert_close(Vh_r, Vh_e, rtol=0, atol=100 * tol)
    err_exact = torch.linalg.matrix_norm(W - reconstruct(U_e, S_e, Vh_e))
    err_rand = torch.linalg.matrix_norm(W - reconstruct(U_r, S_r, Vh_r))
    assert err_rand <= err_exact * (1 + 1e-4)


@pytest.mark.parametrize("shape", [(40, 70), (70, 40)], ids=["wide", "tall"])
def test_gram_svd_equals_the_float64_svd(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * torch.logspace(
        0, -1, shape[1])
    r = 6
    U, S, Vh = gram_svd(W, r)
    U_e, S_e, Vh_e = truncated_svd(W.double(), r)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    torch.testing.assert_close(S.double(), S_e, rtol=1e-6, atol=0)
    torch.testing.assert_close(U.double(), U_e, rtol=0, atol=1e-5)  # same sign convention
    torch.testing.assert_close(Vh.double(), Vh_e, rtol=0, atol=1e-5)
    assert gram_svd(W.double(), r)[0].dtype == torch.float64


def test_gram_svd_falls_back_when_sigma_r_is_tiny():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 50, generator=g,
                                                                           dtype=torch.float64)
    U, S, Vh = gram_svd(W, 5)  # rank 3: sigma_4, sigma_5 ~ 0 cannot be divided by
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    torch.testing.assert_close(reconstruct(U, S, Vh), W)
    with pytest.raises(ValueError, match="rank r"):
        gram_svd(W, 31)


def test_randomized_svd_is_deterministic_per_seed():
    W = torch.randn(60, 45, generator=torch.Generator().manual_seed(1))
    first = randomized_svd(W, 5, seed=3)
    again = randomized_svd(W, 5, seed=3)
    other = randomized_svd(W, 5, seed=4)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])
    # a flat (random) spectrum: different sketches give visibly different factors
    assert (first[1] - other[1]).abs().max() > 0


def test_randomized_svd_full_sketch_is_exact():
    W = torch.randn(12, 9, dtype=torch.float64)
    U, S, Vh = randomized_svd(W, 9, oversample=10, n_iter=0)
    torch.testing.assert_close(reconstruct(U, S, Vh), W)


def correlated_inputs(tokens=200, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, 2, n, dtype=torch.float64)
    return (torch.randn(tokens, n, generator=g, dtype=torch.float64) * scales) @ mixing


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_scaled_svd_cholesky_loss_equals_discarded_energy(method):
    torch.manual_seed(0)
    W = torch.randn(30, 20, dtype=torch.float64)
    X = correlated_inputs()
    L = whitening_factor(X.mT @ X, damp=0.0)
    r = 6
    U, S, Vh = scaled_svd(W, L, r, "cholesky", method=method)
    W_r = reconstruct(U, S, Vh)
    assert torch.linalg.matrix_rank(W_r) == r
    loss = torch.linalg.matrix_norm((W - W_r) @ L) ** 2
    discarded = torch.linalg.svdvals(W @ L)[r:].square().sum()
    rtol = 1e-8 if method == "exact" else 1e-3
    assert math.isclose(loss.item(), discarded.item(), rel_tol=rtol)
    # ...which is the layer's output error on the calibration inputs X
    output_error = torch.linalg.matrix_norm(X @ (W - W_r).mT) ** 2
    assert math.isclose(output_error.item(), loss.item(), rel_tol=1e-8)
    # and it beats plain truncated SVD in that norm
    plain = reconstruct(*truncated_svd(W, r))
    assert loss < torch.linalg.matrix_norm(X @ (W - plain).mT) ** 2


def test_scaled_svd_diag_is_rank_r_and_optimal_in_scaled_norm():
    torch.manual_seed(1)
    W = torch.randn(25, 18, dtype=torch.float64)
    s = torch.rand(18, dtype=torch.float64) * 5 + 0.1
    r = 4
    U, S, Vh = scaled_svd(W, s, r, "diag")
    W_r = reconstruct(U, S, Vh)
    assert torch.linalg.matrix_rank(W_r) == r
    loss = torch.linalg.matrix_norm((W - W_r) * s) ** 2
    discarded = torch.linalg.svdvals(W * s)[r:].square().sum()
    assert math.isclose(loss.item(), discarded.item(), rel_tol=1e-8)
    # s = 1 reduces to the plain truncated SVD
    ones = scaled_svd(W, torch.ones(18, dtype=torch.float64), r, "diag")
    torch.testing.assert_close(reconstruct(*ones), reconstruct(*truncated_svd(W, r)))


def test_scaled_svd_validation():
    W = torch.randn(6, 4)
    with pytest.raises(ValueError, match="> 0"):
        scaled_svd(W, torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, "diag")
    with pytest.raises(ValueError):
        scaled_svd(W, torch.ones(5), 2, "diag")
    with pytest.raises(ValueError):
        scaled_svd(W, torch.eye(4), 2, "svd")
    with pytest.raises(ValueError):
        scaled_svd(W, torch.eye(4), 2, "cholesky", method="fast")


def test_whitening_factor_exact_on_full_rank_covariance():
    X = correlated_inputs()
    C = X.mT @ X
    L = whitening_factor(C, damp=0.0)
    assert L.dtype == torch.float64
    assert torch.equal(L, L.tril())
    torch.testing.assert_close(L @ L.mT, C)


def test_whitening_factor_damps_a_singular_covariance():
    X = correlated_inputs(tokens=5, n=12)  # rank 5 < 12
    C = X.mT @ X
    with pytest.warns(RuntimeWarning, match="damping"):
        L = whitening_factor(C, damp=0.0)
    assert torch.equal(L, L.tril()) and bool(torch.isfinite(L).all())
    assert bool((L.diagonal() > 0).all())


def test_whitening_factor_eigen_fallback():
    C = torch.zeros(8, 8, dtype=torch.float64)
    C[:3, :3] = torch.tensor([[4.0, 2.0, 0.0], [2.0, 5.0, 1.0], [0.0, 1.0, 3.0]])
    C[5, 6] = C[6, 5] = 1.0  # indefinite block: [[0, 1], [1, 0]]
    with pytest.warns(RuntimeWarning, match="eigen"):
        L = whitening_factor(C, damp=0.0, max_tries=0)
    assert torch.equal(L, L.tril()) and bool(torch.isfinite(L).all())
    eigvals, eigvecs = torch.linalg.eigh(C)
    clamped = (eigvecs * eigvals.clamp_min(1e-10 * eigvals.max())) @ eigvecs.mT
    torch.testing.assert_close(L @ L.mT, clamped)
    with pytest.raises(ValueError):
        whitening_factor(torch.full((3, 3), float("nan")))


def test_rank_for_ratio():
    assert rank_for_ratio(576, 576, 0.5) == 144
    assert rank_for_ratio(576, 1536, 1.0) == 418  # floor(576 * 1536 / 2112)
    assert rank_for_ratio(100, 100, 0.2) == 10
    assert rank_for_ratio(4, 4, 0.01) == 1  # at least 1
    for m, n in [(576, 1536), (192, 576), (7, 3)]:
        for ratio in (0.1, 0.33, 0.8, 1.0):
            k = rank_for_ratio(m, n, ratio)
            assert k * (m + n) <= ratio * m * n + 1e-6 or k == 1
            assert (k + 1) * (m + n) > ratio * m * n
    for bad in (0, -0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="ratio"):
            rank_for_ratio(10, 10, bad)
    for m, n in [(0, 5), (5, -1), (2.0, 3)]:
        with pytest.raises(ValueError):
            rank_for_ratio(m, n, 0.5)


def test_rank_for_energy_and_spectrum_summaries():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1, 0 / 14
    assert rank_for_energy(S, 9 / 14) == 1
    assert rank_for_energy(S, 0.65) == 2
    assert rank_for_energy(S, 13 / 14) == 2
    assert rank_for_energy(S, 1.0) == 3
    assert rank_for_energy(torch.zeros(3), 0.9) == 1
    with pytest.raises(ValueError):
        rank_for_energy(S, 0.0)
    assert energy_kept(S, 2) == pytest.approx(13 / 14)
    assert energy_kept(S, 0) == 0.0 and energy_kept(S, 10) == pytest.approx(1.0)
    assert stable_rank(S) == pytest.approx(14 / 9)
    assert stable_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    p = torch.tensor([3.0, 2.0, 1.0]) / 6
    assert effective_rank(S[:3]) == pytest.approx(math.exp(-(p * p.log()).sum().item()))


def test_randomized_svd_on_real_smollm2_weight(smollm2):
    model, _ = smollm2
    W = model.model.layers[0].mlp.down_proj.weight.detach()
    r = 16
    err_exact = torch.linalg.matrix_norm(W - reconstruct(*truncated_svd(W, r)))
    err_rand = torch.linalg.matrix_norm(W - reconstruct(*randomized_svd(W, r)))
    assert err_rand <= 1.01 * err_exact
