"""Training hooks (slimtune.train.hooks): every registered hook trains MiniLM in full, resumes
exactly and refuses adapter methods; then each hook's own claim (TRP's truncation rank and
nuclear sub-gradient, the group count of the proximal step, the forgetting schedule, the
compander's exact start and plain result)."""
import copy

import pytest
import torch
from safetensors.torch import load_file
from test_train import CrashAt
from torch import nn

from slimtune.adapt.registry import make_config
from slimtune.train import ClassificationTask, make_train_config, train
from slimtune.train.hooks import TRAINING_HOOKS, make_hooks
from slimtune.train.hooks import group_sparsity as gs
from slimtune.train.hooks import temporary_forgetting as tf
from slimtune.train.hooks import trp
from slimtune.train.hooks import weight_compander as wc
from slimtune.train.loop import check_compatibility
from slimtune.weights.compander import compand
from slimtune.weights.svd import rank_for_energy

LAYER0 = r"encoder\.encoder\.layer\.0\..*"  # (names inside the classifier: encoder.<BertModel>)
SMALL = {  # a few cheap keys per hook; every registered hook needs a row
    "trp": {"every": 2, "nuclear": 1e-3, "target": LAYER0},
    "group_sparsity": {"active": 0.5, "steps": 3, "target": LAYER0},
    "temporary_forgetting": {"every": 2, "until": 2},
    "weight_compander": {"bound": 2.0, "gain": 2.0},
}


FC = "encoder.encoder.layer.0.intermediate.dense.weight"  # [1536, 384], in the saved result
EFFECT = {  # what each SMALL row visibly did to the saved result (step 4 is its last step)
    "trp": lambda saved, base: torch.linalg.matrix_rank(saved[FC]) < 384,  # truncated at 4
    "group_sparsity": lambda saved, base: int((saved[FC].abs().sum(1) > 0).sum()) == 768,
    "temporary_forgetting": lambda saved, base: (  # reset at step 2: far from the base
        saved["encoder.embeddings.word_embeddings.weight"]
        - base.embeddings.word_embeddings.weight).abs().mean() > 0.01,
    "weight_compander": lambda saved, base: FC in saved,  # a plain weight again
}


def hook_config(name, **fields):
    return make_train_config(data="finefoods", steps=4, batch=2, seqlen=32, lr=1e-4,
                             eval_examples=8, save_every=2,
                             hooks=[{"method": name, **SMALL[name]}], **fields)


def test_every_registered_hook_has_a_row():
    assert sorted(SMALL) == sorted(EFFECT) == TRAINING_HOOKS.names()


@pytest.mark.parametrize("name", TRAINING_HOOKS.names())
def test_hook_trains_minilm_in_full_and_resumes_exactly(minilm, tmp_path, name):
    encoder, tok = minilm
    config = hook_config(name)

    def task():
        return ClassificationTask(tok, "finefoods", seqlen=32, eval_examples=8)

    _, full = train(copy.deepcopy(encoder), task(), config, tmp_path / "full", progress=False)
    assert [r["step"] for r in full["steps"]] == [1, 2, 3, 4]
    with pytest.raises(KeyboardInterrupt):  # dies in step 3, after the checkpoint of step 2
        train(copy.deepcopy(encoder), CrashAt(task(), 3), config, tmp_path / "cut",
              progress=False)
    _, resumed = train(copy.deepcopy(encoder), task(), config, tmp_path / "cut", resume=True,
                       progress=False)
    assert resumed["resumed_at"] == [2]
    assert [r["loss"] for r in resumed["steps"]] == pytest.approx(
        [r["loss"] for r in full["steps"]], rel=1e-5)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "cut"))
    assert a.keys() == b.keys() and not any("parametrizations" in k for k in a)
    assert EFFECT[name](a, encoder)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TRAINING_HOOKS.names())
def test_hook_refuses_an_adapter_method(name):
    config = hook_config(name)
    check_compatibility(config, None)  # full training is fine
    with pytest.raises(ValueError, match=rf"hook {name}: .*'lora' freezes: use {name} with "
                                         r"full training"):
        check_compatibility(config, make_config("lora", r=2))


@pytest.mark.parametrize("spec, message", [
    ({"method": "trp", "energy": 0.5, "rank": 3}, "hook (trp): give energy or rank, not both"),
    ({"method": "trp", "every": 0}, "hook (trp): every: input should be greater than or equal"),
    ({"method": "trp", "energy": 1.5}, "hook (trp): energy: input should be less than or equal"),
    ({"method": "trp", "nuclear": -1}, "hook (trp): nuclear: input should be greater than"),
    ({"method": "trp", "target": ""}, "hook (trp): target: must be 'all-linear'"),
    ({"method": "group_sparsity", "active": 1.5}, "active: a fraction of groups must be in"),
    ({"method": "group_sparsity", "active": 0}, "active: a number of groups must be >= 1"),
    ({"method": "group_sparsity", "groups": "heads"}, "groups: must be 'rows' or 'columns'"),
    ({"method": "temporary_forgetting", "evry": 3}, "evry: unknown parameter; known: seed, every"),
    ({"method": "temporary_forgetting", "std": 0}, "std: input should be greater than 0"),
    ({"method": "weight_compander", "bound": 1.0}, "bound: input should be greater than 1"),
    ({"method": "nope"}, "unknown training hook 'nope'; known: group_sparsity"),
])
def test_bad_hook_keys_are_config_errors(spec, message):
    with pytest.raises(ValueError) as err:
        make_hooks([spec])
    assert message in str(err.value)


# -- TRP ----------------------------------------------------------------------------------------
@pytest.fixture
def dense(minilm):
    """A real MiniLM weight ([1536, 384]) in a one-layer model, float64 for exact checks."""
    source = minilm[0].encoder.layer[0].intermediate.dense
    layer = nn.Linear(384, 1536, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(source.weight)
        layer.bias.copy_(source.bias)
    return nn.Sequential(layer)


def trp_config(**keys):
    return make_hooks([{"method": "trp", **keys}])[0][1]


@pytest.mark.parametrize("keys, expect", [({"rank": 7}, lambda S: 7),
                                          ({"energy": 0.6}, lambda S: rank_for_energy(S, 0.6))])
def test_trp_truncation_keeps_the_chosen_rank_and_spectrum(dense, keys, expect):
    W0 = dense[0].weight.detach().clone()
    S0 = torch.linalg.svdvals(W0)
    k = expect(S0)
    trp.truncate(dense, trp_config(every=3, **keys), step=2)  # not a truncation step
    assert torch.equal(dense[0].weight, W0)
    trp.truncate(dense, trp_config(every=3, **keys), step=3)
    S = torch.linalg.svdvals(dense[0].weight.detach())
    assert int((S > 1e-9 * S[0]).sum()) == k
    torch.testing.assert_close(S[:k], S0[:k])  # Eckart-Young: the top of the spectrum stays
    if "energy" in keys:
        kept = (S0[:k] ** 2).sum() / (S0 ** 2).sum()
        assert kept >= 0.6 > (S0[:k - 1] ** 2).sum() / (S0 ** 2).sum()


@pytest.mark.parametrize("which", ["kept", "nonzero"])
def test_trp_adds_lambda_times_the_nuclear_subgradient(dense, which):
    torch.manual_seed(0)
    W = dense[0].weight
    if which == "nonzero":  # rank-deficient, so "non-zero" differs from "all"
        with torch.no_grad():
            W.copy_(W[:, :12] @ torch.randn(12, 384, dtype=W.dtype) / 4)
    dense(torch.randn(3, 384, dtype=W.dtype)).square().sum().backward()
    task_grad = W.grad.clone()
    config = trp_config(nuclear=0.01, energy=0.8, subgradient=which)
    trp.add_nuclear_subgradient(dense, config, step=0)
    U, S, Vh = torch.linalg.svd(W.detach(), full_matrices=False)
    k = rank_for_energy(S, 0.8) if which == "kept" else 12
    torch.testing.assert_close(W.grad - task_grad, 0.01 * U[:, :k] @ Vh[:k])
    G = (W.grad - task_grad) / 0.01
    if which == "nonzero":  # a sub-gradient of ||W||_*: <G, W> = ||W||_*, ||G||_2 <= 1
        torch.testing.assert_close((G * W).sum(), S.sum())
        assert torch.linalg.matrix_norm(G, 2) <= 1 + 1e-9


# -- group sparsity -----------------------------------------------------------------------------
@pytest.mark.parametrize("groups, active, expect", [("rows", 0.25, 384), ("columns", 10, 10),
                                                    ("columns", 1.0, 384)])
def test_group_sparsity_leaves_the_requested_number_of_groups(dense, groups, active, expect):
    W0 = dense[0].weight.detach().clone()
    norms0 = gs.group_norms(W0, groups)
    config = make_hooks([{"method": "group_sparsity", "groups": groups, "active": active}])[0][1]
    gs.proximal_step(dense, config, step=1)
    W = dense[0].weight.detach()
    norms = gs.group_norms(W, groups)
    assert int((norms > 0).sum()) == expect
    top = torch.topk(norms0, expect).indices  # the strongest groups stay, shrunk by tau in norm
    assert set(torch.nonzero(norms).flatten().tolist()) == set(top.tolist())
    tau = float(torch.topk(norms0, expect + 1).values[-1]) if expect < norms0.numel() else 0.0
    torch.testing.assert_close(norms[top], norms0[top] - tau)


def test_group_sparsity_anneals_the_count_over_steps():
    config = make_hooks([{"method": "group_sparsity", "active": 0.25, "steps": 4}])[0][1]
    assert [gs.kept_groups(100, config, t) for t in range(7)] == [100, 82, 63, 44, 25, 25, 25]
    assert gs.kept_groups(3, config, 9) == 1  # a fraction keeps at least one group


# -- temporary forgetting -----------------------------------------------------------------------
def test_temporary_forgetting_resets_the_embeddings_and_their_state_at_its_steps(minilm):
    encoder = copy.deepcopy(minilm[0])
    E = encoder.get_input_embeddings().weight
    optimizer = torch.optim.AdamW([E, encoder.pooler.dense.weight], lr=1e-3)
    config = make_hooks([{"method": "temporary_forgetting", "every": 2, "until": 5,
                          "seed": 3}])[0][1]
    tf.setup(encoder, config)
    assert tf.init_std(encoder, config) == 0.02  # MiniLM's config.initializer_range
    reset = []
    for step in range(1, 9):
        for p in optimizer.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        optimizer.step()
        before = E.detach().clone()
        tf.forget(encoder, config, step, optimizer)
        if not torch.equal(E, before):
            reset.append(step)
            assert E not in optimizer.state and encoder.pooler.dense.weight in optimizer.state
            expected = torch.randn(E.shape, generator=torch.Generator().manual_seed(
                3 * 1_000_003 + step)) * 0.02
            expected[0] = 0  # BERT's padding row
            assert torch.equal(E.detach(), expected)
        else:
            assert E in optimizer.state
    assert reset == [2, 4]  # every 2 steps, until step 5
    active = make_hooks([{"method": "temporary_forgetting", "every": 3}])[0][1]
    assert [s for s in range(1, 13) if tf.forgets_at(active, s)] == [3, 6, 9, 12]


def test_temporary_forgetting_needs_a_std_without_initializer_range():
    model = nn.Sequential(nn.Embedding(10, 4))
    model.get_input_embeddings = lambda: model[0]
    config = make_hooks([{"method": "temporary_forgetting"}])[0][1]
    with pytest.raises(ValueError, match="no config.initializer_range: give the std key"):
        tf.setup(model, config)
    with pytest.raises(ValueError, match="has no input embeddings"):
        tf.setup(nn.Sequential(nn.Linear(2, 2)), config)


# -- weight compander ---------------------------------------------------------------------------
def test_weight_compander_starts_exactly_and_finishes_as_plain_linears(minilm):
    encoder, tok = minilm
    model = copy.deepcopy(encoder).eval()
    batch = tok(["a fine tasting snack", "stale"], return_tensors="pt", padding=True)
    reference = model(**batch).last_hidden_state
    config = make_hooks([{"method": "weight_compander", "gain": 3.0}])[0][1]
    wc.setup(model, config)
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.endswith("parametrizations.weight.original") for n in names) == 37
    for name, module in model.named_modules():  # w = f(f⁻¹(w₀)) to float32 rounding
        if isinstance(module, nn.Linear):
            torch.testing.assert_close(module.weight, encoder.get_submodule(name).weight,
                                       atol=1e-6, rtol=0)
    torch.testing.assert_close(model(**batch).last_hidden_state, reference, atol=1e-4, rtol=1e-5)
    layer = model.encoder.layer[0].intermediate.dense
    compander = layer.parametrizations.weight[0]
    assert compander.bound == pytest.approx(2.0 * encoder.encoder.layer[0].intermediate
                                            .dense.weight.abs().max().item())
    torch.testing.assert_close(layer.weight, encoder.encoder.layer[0].intermediate.dense.weight,
                               atol=1e-5, rtol=0)
    with torch.no_grad():  # training moves v, even far: w stays within the bound
        v = layer.parametrizations.weight.original
        v.add_(torch.randn(v.shape, generator=torch.Generator().manual_seed(0)))
        v[0, 0] = 1e3
        v = v.detach().clone()
    wc.finish(model, config)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())
    assert type(layer) is nn.Linear and type(layer.weight) is nn.Parameter
    assert torch.equal(layer.weight.detach(), compand(v, compander.bound, 3.0))
    assert layer.weight.abs().max() <= compander.bound * (1 + 1e-6)
    assert layer.weight[0, 0].item() == pytest.approx(compander.bound)  # saturated, not 1e3


def test_weight_compander_refuses_a_tied_weight():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    config = make_hooks([{"method": "weight_compander"}])[0][1]
    with pytest.raises(ValueError, match=r"0.weight is shared \(0.weight, 1.weight\)"):
        wc.setup(model, config)


def test_temporary_forgetting_drops_the_state_of_a_wrapped_base_optimizer():
    from slimtune.train.optimizers import build

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    model.get_input_embeddings = lambda: model[0]
    optimizer = build("sam", model, lr=1e-3)  # SAM steps its base (AdamW) with its gradient
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.base.step()
    E = model[0].weight
    assert E in optimizer.base.state
    config = make_hooks([{"method": "temporary_forgetting", "every": 1, "std": 0.1}])[0][1]
    tf.forget(model, config, 1, optimizer)
    assert E not in optimizer.base.state and model[1].weight in optimizer.base.state
    assert E.detach().std() == pytest.approx(0.1, rel=0.5)
