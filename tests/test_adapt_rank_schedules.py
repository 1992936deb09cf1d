"""Rank schedules that run inside the training loop: DyLoRA, SoRA, IncreLoRA.

Layer-level claims use copies of SmolLM2's layer-0 projections fed the layer's real normalised
PTB embeddings; schedule claims use short real runs of ``slimtune.train.train`` on SmolLM2 cut to
its first two blocks (all linears adapted), interrupted and resumed (same losses, same adapter).

DyLoRA: the drawn rank applies in training only, with scale alpha/b; only the b-th component
trains ("last"); a run draws one rank per step from (seed, step); evaluation inside the loop sees
the full rank; ``slimtune eval --adapter-rank b`` evaluates the rank-b adapter. SoRA: the
proximal step is the formula at the step's learning rate; training zeroes gates and the saved
adapter keeps only the others. IncreLoRA: ranks go to the layers with the highest scores,
growth leaves the outputs unchanged, inactive components stay exactly inert, never-activated
ones are dropped at the end.
"""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

import slimtune.adapt as adapt
from slimtune.adapt.dylora import step_rank
from slimtune.adapt.increlora import new_column
from slimtune.adapt.registry import make_config
from slimtune.adapt.sora import lambda_at, soft_threshold
from slimtune.cli import app
from slimtune.evaluate import perplexity, tokenize_text
from slimtune.targets import factored_layers
from slimtune.train import CausalLMTask, make_train_config, train
from real_layers import first_blocks, layer0_copies as layers
from test_adapt_svd_methods import block0, rel, x  # noqa: F401  (fixtures: layer 0, its input)
from test_train import CrashAt

R = 8
NAMES = ["q_proj", "v_proj", "gate_proj"]
runner = CliRunner()


def apply(model, method, **params):
    return adapt.apply(model, method, targets=list(model), progress=False, **params)


@pytest.fixture(scope="module")
def short(smollm2):
    """SmolLM2 with only its first two decoder blocks (a separate copy; deep-copy to train)."""
    return first_blocks(smollm2[0], 2)


@pytest.fixture(scope="module")
def lm_task(smollm2):
    return lambda: CausalLMTask(smollm2[1], "austen", seqlen=32, eval_tokens=64, seed=0,
                                eval_batch=2)


def run_config(**fields):
    return make_train_config(**{**dict(data="austen", steps=6, batch=2, seqlen=32,
                                       eval_tokens=64, lr=1e-3, save_every=2), **fields})


def resumed_run(short, lm_task, adapter, tmp_path, **fields):
    """The run uninterrupted (``tmp_path/full``) and killed in step 4 then resumed
    (``tmp_path/cut``): same losses, same saved adapter. Returns the uninterrupted run's
    ``(model, history)``."""
    config = run_config(**fields)
    model, full = train(copy.deepcopy(short), lm_task(), config, tmp_path / "full",
                        adapter=adapter, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(short), CrashAt(lm_task(), 4), config, tmp_path / "cut",
              adapter=adapter, progress=False)
    _, resumed = train(copy.deepcopy(short), lm_task(), config, tmp_path / "cut",
                       adapter=adapter, resume=True, progress=False)
    assert resumed["resumed_at"] == [2]
    assert [r["loss"] for r in resumed["steps"]] == pytest.approx(
        [r["loss"] for r in full["steps"]], rel=1e-5)
    a = load_file(tmp_path / "full" / "adapter.safetensors")
    b = load_file(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    return model, full


@torch.no_grad()
def logits(model, ids):
    return model.eval()(ids).logits


# -- DyLoRA -----------------------------------------------------------------------------------
def test_dylora_step_rank_is_uniform_and_seeded():
    config = make_config("dylora", r=6, r_min=2)
    ranks = [step_rank(config, t) for t in range(600)]
    assert ranks == [step_rank(config, t) for t in range(600)]
    assert set(ranks) == {2, 3, 4, 5, 6}
    assert all(60 < ranks.count(b) < 180 for b in range(2, 7))
    assert ranks != [step_rank(make_config("dylora", r=6, r_min=2, seed=1), t)
                     for t in range(600)]


def test_dylora_uses_the_drawn_rank_only_in_training(block0, x):
    model = apply(layers(block0), "dylora", r=R, alpha=16.0)
    layer, W = model["q_proj"], block0.self_attn.q_proj.weight
    part = layer.lowrank
    with torch.no_grad():
        part.B.normal_(generator=torch.Generator().manual_seed(0))

    def at(b):
        return F.linear(x, W + (16.0 / b) * part.B[:, :b] @ part.A[:b]).detach()

    part.sample(3)
    assert rel(layer.train()(x), at(3)) < 1e-5 and part.scale == 16.0 / 3
    assert rel(layer.eval()(x), at(R)) < 1e-5 and part.scale == 16.0 / R
    adapt.use_rank(model, 5)
    assert rel(layer.eval()(x), at(5)) < 1e-5
    assert rel(layer.train()(x), at(3)) < 1e-5  # the step's draw wins while training
    assert rel(layer.dense_weight().detach(), W + (16.0 / 3) * part.B[:, :3] @ part.A[:3]) < 1e-6
    adapt.use_rank(model, None)
    adapt.finish(model)  # the run ended: no draw any more
    assert part.sampled is None and rel(layer.train()(x), at(R)) < 1e-5
    with pytest.raises(ValueError, match=r"rank 9 is not in \[1, 8\]"):
        adapt.use_rank(model, 9)


@pytest.mark.parametrize("update", ["last", "all"])
def test_dylora_trains_the_bth_component_or_the_first_b(block0, x, update):
    model = apply(layers(block0), "dylora", r=R, update=update).train()
    part = model["v_proj"].lowrank
    with torch.no_grad():
        part.B.normal_(generator=torch.Generator().manual_seed(0))
    part.sample(4)
    model["v_proj"](x).square().sum().backward()
    rows = (part.A.grad.abs().sum(dim=1) > 0).tolist()
    cols = (part.B.grad.abs().sum(dim=0) > 0).tolist()
    wanted = [i == 3 if update == "last" else i < 4 for i in range(R)]
    assert rows == wanted and cols == wanted


@pytest.fixture(scope="module")
def dylora_run(short, lm_task, tmp_path_factory):
    """A DyLoRA r=4 run (6 steps, killed and resumed): ``(out, model, history, config)``."""
    tmp = tmp_path_factory.mktemp("dylora")
    config = make_config("dylora", r=4, alpha=8.0, seed=2)
    model, history = resumed_run(short, lm_task, config, tmp)
    return tmp / "full", model, history, config


def test_dylora_run_draws_one_rank_per_step_and_evaluates_at_full_rank(dylora_run, short,
                                                                       lm_task):
    out, model, history, config = dylora_run
    drawn = [step_rank(config, t) for t in range(6)]
    assert len(set(drawn)) > 1 and drawn[-1] < 4  # the last step's draw is not the full rank
    for name, layer in factored_layers(model).items():
        # B starts at 0 and only the drawn b-th column trains in a step ("last")
        trained = set(torch.nonzero(layer.lowrank.B.abs().sum(dim=0)).flatten().tolist())
        assert trained == {b - 1 for b in drawn}, name
    loaded = adapt.load(copy.deepcopy(short), out)
    ppl = lm_task().evaluate(loaded)["perplexity"]
    assert history["final_eval"]["perplexity"] == pytest.approx(ppl, rel=1e-6)
    adapt.use_rank(loaded, drawn[-1])
    assert lm_task().evaluate(loaded)["perplexity"] != pytest.approx(ppl, rel=1e-6)


@pytest.fixture(scope="module")
def austen_chunk(tmp_path_factory):
    from slimtune.data import load_text

    path = tmp_path_factory.mktemp("text") / "austen.txt"
    path.write_text(load_text("austen", "test")[:3000], encoding="utf-8")
    return path


def test_cli_eval_at_an_adapter_rank(dylora_run, smollm2, austen_chunk):
    """``eval --adapter DIR --adapter-rank b`` = the adapter loaded on its base model (the whole
    SmolLM2 recorded in adapter.json) and truncated with ``use_rank``."""
    out = dylora_run[0]
    ids = tokenize_text(smollm2[1], austen_chunk.read_text(encoding="utf-8"))
    seen = {}
    for b in (1, 4):
        result = runner.invoke(app, ["eval", "--adapter", str(out), "--adapter-rank", str(b),
                                     "-d", str(austen_chunk), "--seqlen", "32",
                                     "--max-tokens", "96", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["adapter"] == str(out) and report["adapter_rank"] == b
        model = adapt.use_rank(adapt.load(copy.deepcopy(smollm2[0]), out), b)
        expected = perplexity(model, ids, seqlen=32, max_tokens=96)["perplexity"]
        assert report["perplexity"] == pytest.approx(expected, rel=1e-6)
        seen[b] = report["perplexity"]
    assert seen[1] != pytest.approx(seen[4], rel=1e-4)


@pytest.fixture
def no_loading(monkeypatch):
    import slimtune.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were validated")

    monkeypatch.setattr(slimtune.models, "load_model", refuse)


def test_cli_adapter_rank_errors_before_loading(dylora_run, block0, austen_chunk, no_loading,
                                                tmp_path):
    vera = apply(layers(block0), "vera", r=4)
    adapt.save(vera, tmp_path / "vera")
    text = ["-d", str(austen_chunk), "--seqlen", "32"]
    cases = [
        (["--adapter", str(dylora_run[0]), "--adapter-rank", "5"],
         r"adapter rank 5 is not in \[1, 4\]"),
        (["--model", "smollm2-135m", "--adapter-rank", "2"], "--adapter-rank needs an adapter"),
        (["--model", "smollm2-135m", "--adapter", str(tmp_path / "vera"), "--adapter-rank", "1"],
         "no low-rank part that can be truncated"),
        (["--adapter", str(tmp_path / "missing")], "not a slimtune adapter"),
        ([], "pass --model"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["eval", *args, *text])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0
        assert re.search(message, result.stderr), result.stderr


# -- SoRA -------------------------------------------------------------------------------------
def test_soft_threshold_is_the_l1_proximal_operator():
    g = torch.tensor([-2.0, -0.3, 0.0, 0.2, 0.5, 1.5])
    assert soft_threshold(g, 0.5).tolist() == [-1.5, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_sora_proximal_step_uses_the_steps_learning_rate(block0):
    model = apply(layers(block0), "sora", r=R, **{"lambda": 3.0})
    gates = {n: layer.lowrank.core for n, layer in factored_layers(model).items()}
    start = {n: g.detach().clone() for n, g in gates.items()}
    assert all(bool((g != 0).all()) for g in start.values())
    adapt.after_step(model, 1)  # outside the loop (no optimiser): nothing to size the step with
    assert all(torch.equal(gates[n], start[n]) for n in gates)
    opt = torch.optim.SGD(adapt.trainable_parameters(model).values(), lr=0.1)
    expected = dict(start)
    # the loop moves the schedule before after_step: the rate held now is the next step's
    for step, held, used in ((1, 0.1, 0.1), (2, 0.05, 0.1), (3, 0.05, 0.05)):
        opt.param_groups[0]["lr"] = held
        adapt.after_step(model, step, opt)
        for n in gates:
            expected[n] = soft_threshold(expected[n], used * 3.0)
            assert torch.equal(gates[n], expected[n]), (step, n)
    assert any(bool((g == 0).any()) for g in gates.values())
    config = make_config("sora", **{"lambda": 1.0}, lambda_end=3.0)
    assert [lambda_at(config, t, 4) for t in (0, 2, 4, 9)] == [1.0, 2.0, 3.0, 3.0]


def test_sora_run_zeroes_gates_saves_only_the_others_and_resumes(short, lm_task, tmp_path):
    config = make_config("sora", r=4, **{"lambda": 200.0})
    model, _ = resumed_run(short, lm_task, config, tmp_path)
    layers_ = factored_layers(model)
    ranks = {n: layer.lowrank.rank for n, layer in layers_.items()}
    assert sum(ranks.values()) < 4 * len(ranks) and len(set(ranks.values())) > 1
    for name, layer in layers_.items():  # pruned: all kept gates are non-zero, or one zero gate
        gate = layer.lowrank.core
        assert bool((gate != 0).all()) or (ranks[name] == 1 and float(gate) == 0), name
    out = tmp_path / "full"
    manifest = json.loads((out / "adapter.json").read_text())
    assert {n: d["lowrank"]["rank"] for n, d in manifest["layers"].items()} == ranks
    saved = load_file(out / "adapter.safetensors")
    numel = sum(t.numel() for t in saved.values())
    assert numel == sum(ranks[n] * (layer.in_features + layer.out_features + 1)
                        for n, layer in layers_.items())
    full_rank = sum(4 * (layer.in_features + layer.out_features + 1)
                    for layer in layers_.values())
    assert numel < 0.9 * full_rank
    ids = torch.arange(100, 124)[None]
    loaded = adapt.load(copy.deepcopy(short), out)
    assert rel(logits(loaded, ids), logits(model, ids)) < 1e-6


# -- IncreLoRA --------------------------------------------------------------------------------
def increlora(block0, **params):
    base = dict(r=R, alpha=16.0, init_r=2, target_r=4, add_r=2, top_h=1, warmup=2, interval=2)
    return apply(layers(block0), "increlora", **{**base, **params})


def test_increlora_adds_ranks_to_the_highest_scores(block0, x):
    model = increlora(block0, top_h=2)
    state = adapt.method_state(model)
    names = sorted(factored_layers(model))  # the schedule's order: gate, q, v
    state["active"] = torch.tensor([2, 2, 2])
    state["importance"] = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    state["uncertainty"] = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    for step in (1, 2, 3):  # within the warmup, or between rounds: nothing
        adapt.after_step(model, step)
    assert state["active"].tolist() == [2, 2, 2]
    adapt.after_step(model, 4)
    assert state["active"].tolist() == [2, 4, 4]  # q and v score highest
    state["importance"] = torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64)
    adapt.after_step(model, 6)  # the budget (4 · 3 = 12) has room for 2 more: gate gets them
    assert state["active"].tolist() == [4, 4, 4]
    adapt.after_step(model, 8)
    assert state["active"].tolist() == [4, 4, 4]
    for name, layer in factored_layers(model).items():
        B = layer.lowrank.B
        for j in range(4):
            torch.testing.assert_close(B[:, j], new_column(name, j, B.shape[0], 0, B.dtype))
        assert not B[:, 4:].any() and not layer.lowrank.core.any()
    adapt.finish(model)
    assert {n: layer.lowrank.rank for n, layer in factored_layers(model).items()} == \
        dict.fromkeys(names, 4)


def test_increlora_allocation_follows_real_importance_and_keeps_outputs(block0, x):
    """Only v_proj's target moves, so v_proj's sensitivity and its ranks grow first; every growth
    leaves the outputs unchanged and inactive components stay exactly inert."""
    model = increlora(block0, orth_reg=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        wanted = {n: m(x) for n, m in layers(block0).items()}
        wanted["v_proj"] = wanted["v_proj"] + 0.5 * torch.randn(wanted["v_proj"].shape,
                                                                generator=g)
    A0 = {n: layer.lowrank.A.detach().clone() for n, layer in factored_layers(model).items()}
    opt = torch.optim.AdamW(adapt.trainable_parameters(model).values(), lr=1e-2,
                            weight_decay=0.0)
    state = adapt.method_state(model)
    grown = []
    for step in range(6):
        opt.zero_grad()
        sum((model[n](x) - wanted[n]).square().mean() for n in NAMES).backward()
        adapt.after_backward(model, step)
        opt.step()
        before, active = {n: model[n](x).detach() for n in NAMES}, state["active"].clone()
        adapt.after_step(model, step + 1, opt)
        if not torch.equal(active, state["active"]):
            grown.append(state["active"].tolist())
            assert all(torch.equal(model[n](x), before[n]) for n in NAMES)
        for i, (name, layer) in enumerate(sorted(factored_layers(model).items())):
            k = int(state["active"][i])
            assert not layer.lowrank.B[:, k:].any() and not layer.lowrank.core[k:].any()
            assert torch.equal(layer.lowrank.A[k:], A0[name][k:])
    scores = state["importance"] * state["uncertainty"]
    assert int(scores.argmax()) == 2  # v_proj
    assert grown == [[2, 2, 4], [2, 2, 6]]  # rounds after steps 4 and 6: v_proj both times


def test_increlora_run_grows_within_budget_drops_inactive_and_resumes(short, lm_task, tmp_path):
    config = make_config("increlora", r=8, init_r=2, target_r=4, add_r=2, top_h=3, warmup=1,
                         interval=2)
    model, history = resumed_run(short, lm_task, config, tmp_path)
    assert all(r["extra_loss"] > 0 for r in history["steps"])  # the orthogonal regulariser
    ranks = [layer.lowrank.rank for layer in factored_layers(model).values()]
    assert len(ranks) == 14 and sum(ranks) == 2 * 14 + 3 * 3 * 2  # rounds after steps 2, 4, 6
    assert len(set(ranks)) > 1 and max(ranks) <= 8
    manifest = json.loads((tmp_path / "full" / "adapter.json").read_text())
    assert [d["lowrank"]["rank"] for d in manifest["layers"].values()] == ranks
