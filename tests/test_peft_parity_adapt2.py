"""Parity with PEFT 0.21 for the Adaptation II methods PEFT implements, on SmolLM2 cut to its first
3 blocks (helpers and fixtures from test_peft_parity.py), targets q_proj and v_proj:

- VeRA: the same shared random pair (PEFT's ``projection_prng_key`` = our seed), the same start, and
  after the same trained vectors d, b in both, the same update and logits;
- MiSS: after the same shard D in both (including an input width that r does not divide, which
  both zero-pad), the same update and logits.

Relative error = max |ours - theirs| / max |theirs|; the bar is 1e-4 (as for the LoRA family).
"""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from slimtune import adapt  # noqa: E402
from slimtune.targets import factored_layers  # noqa: E402
from test_peft_parity import TOL, base, ids, logits, rel  # noqa: E402,F401

TARGETS = ["q_proj", "v_proj"]


def peft_model(base, config):
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def pairs(model, other):
    inner = other.base_model.model
    out = [(layer, inner.get_submodule(n)) for n, layer in factored_layers(model).items()]
    assert len(out) == 2 * len(base_blocks(inner))
    return out


def base_blocks(model):
    return model.model.layers


@pytest.mark.parametrize("r,seed", [(8, 0), (64, 3)])
def test_vera_matches_peft(base, ids, r, seed):
    ours = adapt.apply(copy.deepcopy(base), "vera", r=r, seed=seed, targets=TARGETS,
                       progress=False)
    theirs = peft_model(base, peft.VeraConfig(r=r, target_modules=TARGETS,
                                              projection_prng_key=seed, d_initial=0.1))
    assert rel(logits(ours, ids), logits(theirs, ids)) < TOL
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mine, other in pairs(ours, theirs):
            d = torch.randn(mine.lowrank.d.shape, generator=g)
            b = torch.randn(mine.lowrank.b.shape, generator=g) * 0.05
            mine.lowrank.d.copy_(d)
            mine.lowrank.b.copy_(b)
            other.vera_lambda_d["default"].copy_(d)
            other.vera_lambda_b["default"].copy_(b)
            assert rel(mine.lowrank.delta_weight(), other.get_delta_weight("default")) < TOL
    expected = logits(theirs, ids)
    assert rel(logits(base, ids), expected) > 1e-3  # the vectors matter
    assert rel(logits(ours, ids), expected) < TOL


@pytest.mark.parametrize("r", [16, 100])  # 100 does not divide 576: both pad the input
def test_miss_matches_peft(base, ids, r):
    ours = adapt.apply(copy.deepcopy(base), "miss", r=r, targets=TARGETS, progress=False)
    theirs = peft_model(base, peft.MissConfig(r=r, target_modules=TARGETS))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for mine, other in pairs(ours, theirs):
            D = torch.randn(mine.lowrank.D.shape, generator=g) * 0.01
            mine.lowrank.D.copy_(D)
            other.miss_block["default"].copy_(D)
            merged = other.get_delta_weight_miss("default", other.base_layer.weight.clone())
            assert rel(mine.lowrank.delta_weight(), merged - other.base_layer.weight) < TOL
    expected = logits(theirs, ids)
    assert rel(logits(base, ids), expected) > 1e-3
    assert rel(logits(ours, ids), expected) < TOL
