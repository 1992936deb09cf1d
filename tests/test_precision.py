import pytest
import torch

from slimtune.weights.precision import all_finite, compute_dtype


def test_compute_dtype():
    assert compute_dtype(torch.ones(2, dtype=torch.bfloat16)) == torch.float32
    assert compute_dtype(torch.ones(2), torch.ones(2, dtype=torch.float64)) == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_equals_isfinite_all(dtype):
    # the largest entries of a half / float32 tensor, whose sum overflows their dtype (float64
    # entries near 1e308 could overflow the float64 sum: the documented limit)
    big = 1e300 if dtype == torch.float64 else torch.finfo(dtype).max
    t = torch.full((64, 64), big, dtype=dtype)
    t[::2] = -big / 3
    assert all_finite(t) and all_finite(t[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[5, 7] = bad
        assert not all_finite(u)
    u = t.clone()
    u[0, 0], u[1, 1] = float("inf"), -float("inf")  # inf - inf: the sum is NaN, still caught
    assert not all_finite(u)
