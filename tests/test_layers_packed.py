"""The packed quantised base: a real layer quantised, packed, run, saved and reloaded exactly."""
import copy

import pytest
import torch
import torch.nn.functional as F

from slimtune.layers import FactoredLinear, LowRank, PackedQuantBase
from slimtune.weights.quant import QuantSpec, dequantize, round_to_nearest


def packed_layer(linear, spec):
    q, grid = round_to_nearest(linear.weight.detach(), spec)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    layer = FactoredLinear(linear.in_features, linear.out_features,
                           base=PackedQuantBase.from_integers(q, grid), bias=bias)
    return layer, dequantize(q, grid)


@pytest.mark.parametrize("spec", [QuantSpec(4, 64, True), QuantSpec(3, 32, False),
                                  QuantSpec(8, None, True), QuantSpec(2, 64, False)])
def test_forward_is_the_dequantised_weight_and_round_trips(smollm2, spec):
    linear = smollm2[0].model.layers[2].mlp.down_proj  # 576 x 1536
    layer, W_hat = packed_layer(linear, spec)
    x = torch.randn(3, 5, linear.in_features, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), F.linear(x, W_hat), rtol=0, atol=0)
    torch.testing.assert_close(layer.dense_weight(), W_hat, rtol=0, atol=0)
    rebuilt = FactoredLinear.from_description(layer.describe())
    rebuilt.load_state_dict(layer.state_dict())
    assert rebuilt.describe()["base_config"] == {"bits": spec.bits,
                                                 "group_size": spec.group_size, "sym": spec.sym}
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)
    dense_bits = 32 * linear.weight.numel()
    assert layer.base.storage_bits() < dense_bits * (spec.bits + 1.5) / 32
    torch.testing.assert_close(layer.to_dense().weight, W_hat, rtol=0, atol=0)


def test_a_packed_base_refuses_to_absorb_updates_but_keeps_a_low_rank_part(smollm2):
    linear = smollm2[0].model.layers[2].self_attn.k_proj
    layer, W_hat = packed_layer(linear, QuantSpec(4, 32, True))
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 576, generator=g) * 0.01, torch.randn(192, 4, generator=g) * 0.01
    layer.lowrank = LowRank(A, B)
    x = torch.randn(2, 576, generator=g)
    torch.testing.assert_close(layer(x), F.linear(x, W_hat + B @ A), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="cannot absorb an update"):
        layer.merge()


def test_a_model_with_packed_layers_saves_smaller_and_reloads_to_identical_logits(minilm,
                                                                                  tmp_path):
    from slimtune.io.checkpoint import save_model
    from slimtune.models import load_model
    from slimtune.targets import replace_linears

    model, tok = copy.deepcopy(minilm[0]), minilm[1]
    linear_bytes = 4 * sum(m.weight.numel() for m in model.modules()
                           if isinstance(m, torch.nn.Linear))
    replace_linears(model, "all-linear",
                    lambda name, linear: packed_layer(linear, QuantSpec(4, 32, False))[0])
    batch = tok(["a packed model", "reloads exactly"], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**batch).last_hidden_state
    save_model(model, tok, tmp_path / "packed")
    save_model(copy.deepcopy(minilm[0]), tok, tmp_path / "dense")
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors"))
            for d in ("packed", "dense")}
    # the linears shrink to 4-bit (+ a float32 scale and an int8 zero per 32); embeddings stay
    saved = size["dense"] - size["packed"]
    assert saved > linear_bytes * (1 - 5.25 / 32) * 0.99, (size, linear_bytes)
    reloaded, _ = load_model(tmp_path / "packed")
    with torch.no_grad():
        after = reloaded(**batch).last_hidden_state
    torch.testing.assert_close(after, before, rtol=0, atol=0)
