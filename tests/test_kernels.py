"""PyTorch's CPU weight-only kernels behind PackedQuantBase.forward, on real SmolLM2 layers.

Each kernel against the dequantising path (``SLIMTUNE_QUANT_KERNELS=0``) on embeddings of PTB-test
tokens: float32 agrees to max |Δ| / max |y| <= 1e-5, bfloat16 to 2e-2 (a few bfloat16 steps:
each path rounds differently). Also which path runs, the prepared-operand cache and its
invalidation, the fall-backs, and a state-dict round trip of a model with packed layers.
"""
import copy

import pytest
import torch

from slimtune.layers import FactoredLinear, LowRank, PackedQuantBase
from slimtune.layers import kernels
from slimtune.layers.kernels import DEQUANTIZE, forward_path
from slimtune.weights.quant import QuantSpec, round_to_nearest

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SPECS = {"int4-g32-sym": QuantSpec(4, 32, True), "int4-g64-asym": QuantSpec(4, 64, False),
         "int4-channel-asym": QuantSpec(4, None, False),
         "int8-channel-sym": QuantSpec(8, None, True)}


@pytest.fixture(scope="module")
def real(smollm2, ptb_test_ids):
    """(block 0, embeddings [512, 576] of PTB-test tokens, their MLP activations [512, 1536])."""
    model = smollm2[0]
    ids = ptb_test_ids[:512]
    block = model.model.layers[0]
    with torch.no_grad():
        emb = model.model.embed_tokens.weight[ids].clone()
        act = block.mlp.act_fn(block.mlp.gate_proj(emb)) * block.mlp.up_proj(emb)
    assert emb.shape == (512, 576) and act.shape == (512, 1536)
    return block, emb, act


def packed(linear, spec) -> PackedQuantBase:
    return PackedQuantBase.from_integers(*round_to_nearest(linear.weight.detach(), spec))


def dequantized(base, x, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv(kernels.ENV_SWITCH, "0")
        assert forward_path(base, x) == DEQUANTIZE
        return base(x)


def rel_err(y, ref) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


@pytest.mark.parametrize("layer", ["self_attn.q_proj", "mlp.down_proj"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_kernel_matches_the_dequantising_path(real, layer, spec_name, monkeypatch):
    block, emb, act = real
    spec = SPECS[spec_name]
    base = packed(block.get_submodule(layer), spec)
    inputs = act if layer == "mlp.down_proj" else emb
    name = "int8" if spec.bits == 8 else "int4"
    with torch.no_grad():
        for dtype, tokens in [(torch.float32, 1), (torch.float32, 4), (torch.bfloat16, 1),
                              (torch.bfloat16, 512)]:
            x = inputs[:tokens].to(dtype)
            assert forward_path(base, x) == name
            y = base(x)
            assert y.dtype == dtype and y.shape == (tokens, base.packed.shape[0])
            assert rel_err(y, dequantized(base, x, monkeypatch)) <= TOLERANCE[dtype]
        x = inputs[:4].to(torch.bfloat16).reshape(2, 2, -1)  # leading dims are kept
        assert base(x).shape == (2, 2, base.packed.shape[0])
        x = inputs.float()  # float32 runs a scalar kernel: many tokens dequantise
        assert forward_path(base, x) == DEQUANTIZE
        torch.testing.assert_close(base(x), dequantized(base, x, monkeypatch), rtol=0, atol=0)


@pytest.mark.parametrize("spec", [QuantSpec(3, 64, False), QuantSpec(8, None, False),
                                  QuantSpec(8, 64, True), QuantSpec(4, 16, True),
                                  QuantSpec(2, 32, True)])
def test_settings_without_a_kernel_dequantize(real, spec):
    block, emb, _ = real
    base = packed(block.self_attn.k_proj, spec)
    assert kernels.kernel_for(base) is None
    x = emb[:1]
    assert forward_path(base, x) == DEQUANTIZE and base(x).shape == (1, 192)
    assert base._kernel_cache is None


def test_inputs_the_kernels_do_not_take_dequantize(real, monkeypatch):
    block, emb, _ = real
    base = packed(block.self_attn.k_proj, QuantSpec(4, 32, True))
    odd = PackedQuantBase.from_integers(*round_to_nearest(block.self_attn.k_proj.weight[:40]
                                                          .detach(), QuantSpec(4, 32, True)))
    assert kernels.kernel_for(odd) is None  # 40 rows: int4 packing needs a multiple of 16
    assert forward_path(base, emb[:1].double()) == DEQUANTIZE
    assert forward_path(base, emb[:1].to("meta")) == DEQUANTIZE  # not a CPU tensor
    x = emb[:2].clone().requires_grad_(True)  # the kernels have no backward
    assert forward_path(base, x) == DEQUANTIZE
    base(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert forward_path(base, x) == "int4"
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    with torch.no_grad():
        assert forward_path(base, emb[:1]) == DEQUANTIZE


def test_the_prepared_operands_are_cached_and_remade_when_the_buffers_change(real, monkeypatch):
    block, emb, _ = real
    q_proj, k_proj = block.self_attn.q_proj, block.self_attn.k_proj
    spec = QuantSpec(4, 64, False)
    base = packed(q_proj, spec)
    x = emb[:1]
    with torch.no_grad():
        y0 = base(x)
        operands = base._kernel_cache.operands
        base(x)
        assert base._kernel_cache.operands is operands  # reused
        assert not any("kernel" in k for k in base.state_dict())
        other = packed(q_proj, QuantSpec(4, 64, True))  # same shapes, other values
        base.load_state_dict(other.state_dict())
        y1 = base(x)
        assert base._kernel_cache.operands is not operands
        assert rel_err(y1, dequantized(other, x, monkeypatch)) <= TOLERANCE[torch.float32]
        assert rel_err(y1, y0) > 1e-3
        base.scale = base.scale * 2  # a new tensor at the same name
        torch.testing.assert_close(base(x), 2 * y1, rtol=1e-5, atol=1e-6)
        base.zero.zero_()  # written in place
        assert rel_err(base(x), dequantized(base, x, monkeypatch)) <= TOLERANCE[torch.float32]
        base(x.bfloat16())  # another dtype remakes them for that dtype
        assert base._kernel_cache.operands[1].dtype == torch.bfloat16
        copied = copy.deepcopy(base)
        assert copied._kernel_cache.operands == ()  # a copy prepares its own
        torch.testing.assert_close(copied(x), base(x), rtol=0, atol=0)
        small = packed(k_proj, spec)
        small(x)
        small.to("meta")  # off the CPU: the CPU operands are dropped
        small(x.to("meta"))
        assert small._kernel_cache is None


def test_a_model_with_packed_layers_round_trips_to_the_same_logits(smollm2, monkeypatch):
    from slimtune.targets import replace_linears, set_module

    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    g = torch.Generator().manual_seed(0)

    def factory(name, linear):
        base = packed(linear, QuantSpec(4, 32, True) if "mlp" in name else QuantSpec(8, None, True))
        n, m = linear.in_features, linear.out_features
        lowrank = LowRank(torch.randn(4, n, generator=g) * 0.01, torch.randn(m, 4, generator=g)
                          * 0.01) if name.endswith("q_proj") else None
        return FactoredLinear(n, m, base=base, lowrank=lowrank)

    layers = replace_linears(model, r"model\.layers\.0\..*_proj", factory)
    assert len(layers) == 7
    prompt = torch.tensor([tok("The packed model reloads")["input_ids"]])
    step = prompt[:, :1]  # one token runs the kernels, the whole prompt dequantises
    assert all(forward_path(layer.base, torch.zeros(1, 1, layer.in_features)) != DEQUANTIZE
               for layer in layers.values())
    with torch.no_grad():
        before = model(step).logits, model(prompt).logits
        with monkeypatch.context() as m:
            m.setenv(kernels.ENV_SWITCH, "0")
            dequant = model(step).logits
        assert rel_err(before[0], dequant) <= 1e-4
        for name, layer in layers.items():
            rebuilt = FactoredLinear.from_description(layer.describe())
            rebuilt.load_state_dict(layer.state_dict())
            set_module(model, name, rebuilt)
        after = model(step).logits, model(prompt).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
