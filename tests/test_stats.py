import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtune.weights.stats import FisherDiagonal, InputStatistics


def batches(shapes, n_features, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, n_features, generator=g, dtype=dtype) * 3 + 1 for shape in shapes]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_streaming_equals_one_shot(dtype):
    n = 7
    xs = batches([(2, 5), (3,), (1, 4, 2), (11,)], n)
    stats = InputStatistics(n, dtype=dtype)
    for x in xs:
        stats.update(x)
    X = torch.cat([x.reshape(-1, n) for x in xs]).to(torch.float64)
    tol = dict(rtol=1e-12, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    assert stats.n_tokens == X.shape[0] == 32
    torch.testing.assert_close(stats.gram().double(), X.mT @ X, **tol)
    torch.testing.assert_close(stats.covariance().double(), X.mT @ X / 32, **tol)
    torch.testing.assert_close(stats.mean_abs().double(), X.abs().mean(0), **tol)
    torch.testing.assert_close(stats.sq_norm().double(), X.square().sum(0), **tol)
    assert stats.covariance().dtype == dtype


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=5),
       seed=st.integers(0, 1000))
def test_streaming_any_split_equals_one_shot(n, sizes, seed):
    xs = batches([(size,) for size in sizes], n, seed=seed, dtype=torch.float64)
    stats = InputStatistics(n)
    for x in xs:
        stats.update(x)
    X = torch.cat(xs)
    torch.testing.assert_close(stats.covariance(), X.mT @ X / X.shape[0])
    torch.testing.assert_close(stats.mean_abs(), X.abs().mean(0))
    torch.testing.assert_close(stats.sq_norm(), stats.gram().diagonal())


def test_merge_equals_single_stream():
    n = 5
    xs = batches([(4,), (6,), (3,)], n)
    whole, left, right = InputStatistics(n), InputStatistics(n), InputStatistics(n)
    for x in xs:
        whole.update(x)
    left.update(xs[0])
    right.update(xs[1])
    right.update(xs[2])
    left.merge(right)
    assert left.n_tokens == whole.n_tokens
    torch.testing.assert_close(left.covariance(), whole.covariance())
    torch.testing.assert_close(left.mean_abs(), whole.mean_abs())


def test_input_statistics_validation_and_no_gram():
    stats = InputStatistics(3, track_gram=False)
    with pytest.raises(ValueError, match="update"):
        stats.mean_abs()
    with pytest.raises(ValueError, match="last dim"):
        stats.update(torch.randn(2, 4))
    stats.update(torch.randn(2, 3, dtype=torch.bfloat16))  # any input dtype is accepted
    assert stats.n_tokens == 2 and stats.sq_norm().dtype == torch.float64
    with pytest.raises(ValueError, match="track_gram"):
        stats.covariance()
    with pytest.raises(ValueError):
        InputStatistics(3, dtype=torch.float16)


def test_tracked_kinds_agree_and_untracked_abs_is_a_clear_error():
    """Without the Gram, sum x^2 is its own pass; with it, the Gram's diagonal. Both agree."""
    n = 130  # more than one GRAM_BLOCK: the diagonal spans two blocks
    xs = batches([(40,), (7, 3)], n)
    full, gram_only, sums_only = (InputStatistics(n), InputStatistics(n, track_abs=False),
                                  InputStatistics(n, track_gram=False))
    for x in xs:
        for s in (full, gram_only, sums_only):
            s.update(x)
    X = torch.cat([x.reshape(-1, n) for x in xs]).double()
    for s in (full, gram_only, sums_only):
        torch.testing.assert_close(s.sq_norm(), X.square().sum(0))
    assert gram_only.abs_sum is None
    with pytest.raises(ValueError, match="track_abs"):
        gram_only.mean_abs()
    with pytest.raises(ValueError, match="sum \\|x\\|"):
        full.merge(gram_only)
    gram_only.sq_sum.zero_()  # a copy: the Gram is untouched
    torch.testing.assert_close(gram_only.gram(), X.mT @ X)
    other = InputStatistics(n, track_gram=False)
    other.update(xs[0])
    sums_only.merge(other)
    torch.testing.assert_close(sums_only.sq_norm(),
                               X.square().sum(0) + xs[0].double().square().sum(0))


def test_update_ignores_autograd():
    x = torch.randn(4, 3, requires_grad=True)
    stats = InputStatistics(3)
    stats.update(x)
    assert not stats.gram().requires_grad


def test_fisher_diagonal():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=g) for _ in range(5)]
    fisher = FisherDiagonal((4, 3))
    with pytest.raises(ValueError, match="update"):
        fisher.fisher()
    for grad in grads:
        fisher.update(grad)
    expected = torch.stack(grads).double().square().mean(0)
    assert fisher.count == 5
    torch.testing.assert_close(fisher.fisher(), expected)
    torch.testing.assert_close(fisher.row_importance(), expected.sum(1))
    with pytest.raises(ValueError, match="shape"):
        fisher.update(torch.randn(3, 4))


def test_bfloat16_products_round_only_the_inputs():
    """product_dtype=bfloat16: the Gram is the float32-accumulated Gram of the bfloat16-rounded
    inputs (not a bfloat16 matmul's rounded result); sum |x| stays exact; the process's matmul
    precision is restored afterwards."""
    n = 300  # more than one 256-row product block
    xs = batches([(700,), (5000,)], n, seed=3)
    stats = InputStatistics(n, dtype=torch.float32, product_dtype=torch.bfloat16)
    exact = InputStatistics(n, dtype=torch.float64)
    before = torch.backends.mkldnn.matmul.fp32_precision
    for x in xs:
        stats.update(x)
        exact.update(x)
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    rounded = torch.cat(xs).bfloat16().double()
    gram = stats.gram()
    assert gram.dtype == torch.float32 and stats.n_tokens == exact.n_tokens == 5700
    assert torch.equal(gram, gram.mT)
    assert rel_err(gram.double(), rounded.mT @ rounded) < 1e-5
    assert 1e-5 < rel_err(gram.double(), exact.gram()) < 4e-3  # bfloat16's rounding of x
    assert rel_err(stats.mean_abs().double(), exact.mean_abs()) < 1e-6
    for dtype, product in ((torch.float32, torch.float16), (torch.float64, torch.bfloat16)):
        with pytest.raises(ValueError, match="product_dtype"):
            InputStatistics(n, dtype=dtype, product_dtype=product)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())
