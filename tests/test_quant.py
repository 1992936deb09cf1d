"""The quantisation grid (slimtune.weights.quant): the compressed-tensors convention, worked by
hand on small matrices, and its error bound on a real SmolLM2 weight."""
import pytest
import torch

from slimtune.weights.quant import (QuantSpec, dequantize, fit_grid, quantize,
                                    round_to_nearest)


def test_symmetric_grid_by_hand():
    W = torch.tensor([[0.5, -0.8, 0.25, 1.0]])
    grid = fit_grid(W, QuantSpec(bits=4, sym=True))  # q in -8..7, scale = 1.0 / 7.5
    assert grid.scale.item() == pytest.approx(1.0 / 7.5) and grid.zero.item() == 0
    q = quantize(W, grid)
    assert q.tolist() == [[4, -6, 2, 7]]  # 3.75 -> 4, -6, 1.875 -> 2, 7.5 -> clamped to 7
    assert torch.allclose(dequantize(q, grid), q.float() / 7.5)


def test_asymmetric_grid_by_hand_includes_zero():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # all positive: the range is widened to [0, 4]
    grid = fit_grid(W, QuantSpec(bits=2, sym=False))  # q in -2..1, scale 4/3, zero -2
    assert grid.scale.item() == pytest.approx(4 / 3) and grid.zero.item() == -2
    q = quantize(W, grid)
    assert q.tolist() == [[-1, 0, 0, 1]]  # round(0.75)-2, round(1.5)-2, round(2.25)-2, 3-2
    assert dequantize(torch.full((1, 4), -2, dtype=torch.int32), grid).tolist() == [[0.0] * 4]


def test_groups_split_the_input_dimension():
    W = torch.cat([torch.full((2, 4), 0.1), torch.full((2, 4), 10.0)], dim=1)
    grid = fit_grid(W, QuantSpec(bits=8, group_size=4))
    assert grid.scale.shape == (2, 2) and bool((grid.scale[:, 1] > 50 * grid.scale[:, 0]).all())
    torch.testing.assert_close(dequantize(quantize(W, grid), grid), W, rtol=1e-2, atol=0)
    all_zero = fit_grid(torch.zeros(1, 4), QuantSpec(bits=3))
    assert all_zero.scale.item() == 1.0


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 1}, "bits must be an int in 2..8"), ({"bits": 9}, "bits"),
    ({"bits": 4.0}, "bits"), ({"bits": 4, "group_size": 0}, "group_size"),
])
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_a_group_size_that_does_not_divide_the_inputs_is_refused():
    with pytest.raises(ValueError, match="group_size 128 does not divide the 576 inputs"):
        fit_grid(torch.zeros(4, 576), QuantSpec(bits=4, group_size=128))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_at_most_half_a_step_on_a_real_weight(smollm2, bits, group_size, sym):
    W = smollm2[0].model.layers[3].self_attn.k_proj.weight.detach()
    spec = QuantSpec(bits, group_size, sym)
    q, grid = round_to_nearest(W, spec)
    assert int(q.min()) >= spec.q_min and int(q.max()) <= spec.q_max
    step = grid.scale.repeat_interleave(spec.group_width(W.shape[1]), dim=1)
    err = (dequantize(q, grid) - W).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-7).all())
