"""AdaLoRA against PEFT 0.21 and in real training, on SmolLM2 cut to 3 decoder blocks (q_proj,
v_proj adapted: 6 layers; fixtures from test_peft_parity.py, training helpers from test_train.py).

- initialisation: PEFT's init (P, Q ~ N(0, 0.02²), Λ = 0: the output is the base model's); with
  the same P, Λ, Q copied into PEFT's SVD layers, the same updates, logits and orthogonal
  regulariser (PEFT adds it to ``outputs.loss``);
- the allocator: the gradients of our model's loss are copied into PEFT's parameters each step,
  then PEFT's ``update_and_allocate(t)`` and our ``after_backward(t)`` / ``after_step(t + 1)``
  run on the same weights (no optimiser: between steps the same seeded change is added to both
  models' P, Λ, Q, masked Λ included, which each masking, and every step of the final phase,
  must zero again); budgets, averages, Λ and the masked sets agree at every step;
- ``slimtune.train``: the schedule runs in the loop's hooks, the run ends at the target budget,
  the saved adapter holds only the kept ranks, and a crashed run resumes to the same losses,
  masks and adapter;
- bad settings are one config error, a run too short for the phases one error at its first step.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")

from slimtune import adapt  # noqa: E402
from slimtune.adapt.adalora import budget_schedule, rank_allocation  # noqa: E402
from slimtune.adapt.registry import make_config  # noqa: E402
from slimtune.targets import factored_layers  # noqa: E402
from slimtune.train import train  # noqa: E402
from test_peft_parity import (ALPHA, BLOCKS, TARGETS, TOL, R, base, ids,  # noqa: E402,F401
                              layer_pairs, logits, ours, rel)
from test_train import CrashAt, lm_task, small_config  # noqa: E402,F401

N_LAYERS = len(TARGETS) * BLOCKS


def theirs(base, **config):
    config = peft.AdaLoraConfig(init_r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                lora_dropout=0.0, task_type="CAUSAL_LM", **config)
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def peft_triplet(layer):
    return layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]


@torch.no_grad()
def share_factors(pairs, seed=0):
    """A non-zero Λ in our layers (P and Q as initialised), copied with P and Q into PEFT's."""
    g = torch.Generator().manual_seed(seed)
    for _, mine, other in pairs:
        lr = mine.lowrank
        lr.core.copy_(torch.randn(R, generator=g))
        A, E, B = peft_triplet(other)
        A.copy_(lr.A), E.copy_(lr.core[:, None]), B.copy_(lr.B)


@torch.no_grad()
def nudge(pairs, g):
    """The same seeded change to both models' P, Λ, Q (a stand-in for an optimiser step)."""
    for _, mine, other in pairs:
        lr = mine.lowrank
        for ours_p, theirs_p in zip((lr.A, lr.core, lr.B), peft_triplet(other)):
            change = 0.05 * torch.randn(ours_p.shape, generator=g) * ours_p.abs().mean()
            ours_p.add_(change)
            theirs_p.add_(change.view(theirs_p.shape))


def causal_lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


# -- initialisation -----------------------------------------------------------------------------
def test_adalora_starts_as_peft_and_matches_its_forward_and_regulariser(base, ids):
    mine = ours(base, "adalora", target_r=4, total_step=10)
    other = theirs(base, target_r=4, total_step=10)
    pairs = layer_pairs(mine, other)
    for _, layer, svd in pairs:  # PEFT's init: Λ = 0, P and Q ~ N(0, 0.02²)
        A, E, B = peft_triplet(svd)
        assert not layer.lowrank.core.any() and not E.any()
        for p in (layer.lowrank.A, layer.lowrank.B, A, B):
            p = p.detach()
            assert abs(float(p.std()) - 0.02) < 2e-3 and abs(float(p.mean())) < 2e-3
        assert layer.lowrank.scale == pytest.approx(ALPHA / R)
    assert rel(logits(mine, ids), logits(base, ids)) < 1e-6

    share_factors(pairs)
    for name, layer, svd in pairs:
        assert rel(layer.lowrank.delta_weight(), svd.get_delta_weight("default")) < TOL, name
    expected = logits(base, ids)
    got, want = logits(mine, ids), logits(other, ids)
    assert rel(got, expected) > 1e-3  # the shared Λ changes the output
    assert rel(got, want) < TOL

    with torch.no_grad():  # PEFT adds the regulariser to the loss of a forward with labels
        out = other(input_ids=ids, labels=ids, use_cache=False)
        peft_regulariser = out.loss - causal_lm_loss(out.logits, ids)
        regulariser = adapt.extra_loss(mine)
    assert float(regulariser) > 0.1
    assert abs(float(regulariser) - float(peft_regulariser)) < TOL * float(regulariser)


# -- the rank allocator ---------------------------------------------------------------------------
def test_allocator_matches_peft_rank_allocator_step_by_step(base, ids):
    schedule = dict(target_r=4, tinit=2, tfinal=3, deltaT=2, total_step=12)
    T = schedule["total_step"]
    mine = ours(base, "adalora", **schedule)
    other = theirs(base, **schedule)
    allocator = other.base_model.rankallocator
    pairs = layer_pairs(mine, other)
    share_factors(pairs)
    start, target = R * N_LAYERS, schedule["target_r"] * N_LAYERS
    config = adapt.adapter_config(mine)
    g = torch.Generator().manual_seed(1)
    for t in range(T):
        assert budget_schedule(t, start, target, config, T) == allocator.budget_schedule(t)
        mine.zero_grad(set_to_none=True)
        mine(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for _, layer, svd in pairs:
            lr = layer.lowrank
            for ours_p, theirs_p in zip((lr.A, lr.core, lr.B), peft_triplet(svd)):
                theirs_p.grad = ours_p.grad.detach().clone().view(theirs_p.shape)
        adapt.after_backward(mine, t)
        other.base_model.update_and_allocate(t)
        adapt.after_step(mine, t + 1)
        state = adapt.method_state(mine)
        for name, layer, svd in pairs:
            lr = layer.lowrank
            A, E, B = peft_triplet(svd)
            assert torch.equal(lr.core, E.detach().view(-1)), (t, name)
            if t < T - schedule["tfinal"]:
                for part, p in (("A", A), ("core", E), ("B", B)):
                    key = f"{name}.lowrank.{part}"
                    theirs_key = next(k for k in allocator.exp_avg_ipt
                                      if k.endswith(f"{name}.lora_{'E' if part == 'core' else part}"
                                                    ".default"))
                    torch.testing.assert_close(state["sensitivity"][key].view(p.shape),
                                               allocator.exp_avg_ipt[theirs_key])
                    torch.testing.assert_close(state["uncertainty"][key].view(p.shape),
                                               allocator.exp_avg_unc[theirs_key])
        budget, masks = allocator.budget_schedule(t)
        if t > schedule["tinit"] and (masks or t >= T - schedule["tfinal"]):
            assert sum(rank_allocation(mine).values()) == budget  # distinct scores: no ties
        nudge(pairs, g)
    assert "sensitivity" not in adapt.method_state(mine)  # dropped for the final phase
    pattern = other.peft_config["default"].rank_pattern
    for name, layer, _ in pairs:
        key = next(k for k in pattern if k.endswith(f"{name}.lora_E.default"))
        assert layer.lowrank.grad_scale.bool().tolist() == pattern[key]
    assert sum(rank_allocation(mine).values()) == target


# -- training through slimtune.train --------------------------------------------------------------
ADALORA = dict(r=4, target_r=2, tinit=1, tfinal=2, deltaT=1, targets=TARGETS)


def adapter_bytes(path) -> int:
    return (path / "adapter.safetensors").stat().st_size


def test_training_reaches_the_target_budget_and_resumes_exactly(base, lm_task, ids, tmp_path):
    config = small_config(steps=8, warmup=1, save_every=3, lr=1e-2)
    adapter = make_config("adalora", **ADALORA)
    init = adapt.save(adapt.apply(copy.deepcopy(base), progress=False, **ADALORA,
                                  method="adalora"), tmp_path / "init")
    model, full = train(copy.deepcopy(base), lm_task(), config, tmp_path / "full",
                        adapter=adapter, progress=False)
    assert all("extra_loss" in r for r in full["steps"])  # the regulariser is in the loss
    ranks = rank_allocation(model)
    assert sum(ranks.values()) == ADALORA["target_r"] * N_LAYERS
    manifest = adapt.read_manifest(tmp_path / "full")
    assert {n: d["lowrank"]["rank"] for n, d in manifest["layers"].items()} == ranks
    assert all(layer.lowrank.grad_scale is None for layer in factored_layers(model).values())
    assert adapter_bytes(tmp_path / "full") < adapter_bytes(init)
    loaded = adapt.load(copy.deepcopy(base), tmp_path / "full")
    assert rel(logits(loaded, ids), logits(model, ids)) < 1e-6

    with pytest.raises(KeyboardInterrupt):  # dies in step 5 (budget phase), after step 3's save
        train(copy.deepcopy(base), CrashAt(lm_task(), 5), config, tmp_path / "cut",
              adapter=adapter, progress=False)
    _, resumed = train(copy.deepcopy(base), lm_task(), config, tmp_path / "cut",
                       adapter=adapter, resume=True, progress=False)
    assert resumed["resumed_at"] == [3]
    for key in ("loss", "extra_loss", "grad_norm"):
        assert [r[key] for r in resumed["steps"]] == pytest.approx(
            [r[key] for r in full["steps"]], rel=1e-5)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter.safetensors") for d in ("full", "cut"))
    assert a.keys() == b.keys()
    for k in a:  # same shapes: the same triplets were kept
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_a_layer_that_loses_every_rank_saves_reloads_and_exports(base, ids, tmp_path):
    model = ours(base, "adalora", target_r=4, total_step=10)
    layers = list(factored_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            layer.lowrank.core.normal_()
        layers[0].lowrank.core.zero_()
        layers[0].lowrank.grad_scale.zero_()
        layers[1].lowrank.core[:3] = 0
        layers[1].lowrank.grad_scale[:3] = 0
    trained = logits(model, ids)
    adapt.finish(model)
    assert list(rank_allocation(model).values())[:3] == [0, R - 3, R]
    assert rel(logits(model, ids), trained) < 1e-6
    loaded = adapt.load(copy.deepcopy(base), adapt.save(model, tmp_path / "adapter"))
    assert rel(logits(loaded, ids), trained) < 1e-6
    exported = adapt.to_peft(model, tmp_path / "peft")  # per-layer ranks; the rank-0 layer left out
    config = json.loads((exported / "adapter_config.json").read_text())
    names = list(factored_layers(model))
    assert names[0] not in config["target_modules"] and config["rank_pattern"][names[1]] == R - 3
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), exported).eval()
    assert rel(logits(in_peft, ids), trained) < TOL


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,message", [
    ({"r": 4, "target_r": 8}, "ends above its start"),
    ({"tinit": 5, "tfinal": 5, "total_step": 10}, "no budgeting phase"),
    ({"target_r": 0}, "target_r"), ({"tinit": -1}, "tinit"), ({"tfinal": -1}, "tfinal"),
    ({"deltaT": 0}, "deltaT"), ({"beta1": 1.0}, "beta1"), ({"beta2": 0.0}, "beta2"),
    ({"orth_reg_weight": -0.1}, "orth_reg_weight"), ({"total_step": 0}, "total_step"),
])
def test_bad_settings_are_one_config_error(params, message):
    with pytest.raises(ValueError, match=rf"adapter \(adalora\): .*{message}"):
        make_config("adalora", **{"r": 8, **params})


def test_schedule_needs_a_known_run_length_with_room_for_the_phases(base, lm_task, tmp_path):
    model = ours(base, "adalora", target_r=4)
    with pytest.raises(ValueError, match="needs total_step"):
        adapt.after_backward(model, 0)
    adapter = make_config("adalora", **{**ADALORA, "tinit": 2, "tfinal": 2})
    with pytest.raises(ValueError, match="tinit=2 \\+ tfinal=2 must be below total_step=4"):
        train(copy.deepcopy(base), lm_task(), small_config(steps=4, warmup=1), tmp_path / "out",
              adapter=adapter, progress=False)
