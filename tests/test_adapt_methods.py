"""The test matrix every adapter method must pass, on SmolLM2-135M.

Parametrised over ``slimtune.adapt.known_methods()`` at collection time, so a newly registered
method is tested without touching this file; data-driven methods (those with ``prepare``) get
``calib=`` PTB-train token windows. Each method is applied once per module (``adapted``) and the
tests restore what they change. The fast matrix targets ``q_proj`` and ``v_proj`` (cheap SVDs);
``test_all_linear_start_and_trainable_set`` repeats the core claims on every linear (slow), and
MiniLM (every linear biased) is adapted on all linears. Methods must also keep bfloat16 and
float64 weights in their dtype.

A method whose config says ``exact_start`` is false (a pretraining parameterisation that replaces
the weight, as SLTrain's and LOST's defaults) is not held to the base model's output at step 0;
its start must instead be finite and exactly what its layers' own dense weights compute (the
model equals its merge into plain linears). Its method-specific tests check the structure.
"""
from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import slimtune.adapt as adapt
from slimtune.layers import FactoredLinear
from slimtune.targets import factored_layers, match_targets

METHODS = adapt.known_methods()
R = 8
FAST_TARGETS = ["q_proj", "v_proj"]
ONE_LAYER = "model.layers.0.self_attn.q_proj"

# What each method trains inside an adapted layer. A method missing here gets only the generic
# check (factors, transforms or sparse values of adapted layers, nothing else); add it here.
LOW_RANK = {"lowrank.A", "lowrank.B"}
TRAINABLE = {"lora": LOW_RANK, "pissa": LOW_RANK, "milora": LOW_RANK, "olora": LOW_RANK,
             "corda": LOW_RANK, "eva": LOW_RANK, "dora": LOW_RANK | {"transform.magnitude"},
             "svfit": {"lowrank.core"}, "sorsa": LOW_RANK | {"lowrank.core"},
             "sltrain": LOW_RANK | {"sparse.values"}, "lost": LOW_RANK | {"sparse.values"},
             "sst": LOW_RANK | {"lowrank.core"}, "vera": {"lowrank.d", "lowrank.b"},
             "nola": {"lowrank.alpha", "lowrank.beta"}, "miss": {"lowrank.D"},
             "lora_xs": {"lowrank.core"}, "adalora": LOW_RANK | {"lowrank.core"},
             "sft": {"sparse.values"}, "sara": {"sparse.values"},
             "dsee": LOW_RANK | {"sparse.values"}, "dylora": LOW_RANK,
             "sora": LOW_RANK | {"lowrank.core"}, "increlora": LOW_RANK | {"lowrank.core"},
             "loldu": {"lowrank.core"}, "lora_sb": {"lowrank.core"}, "allora": LOW_RANK,
             "ggpo": LOW_RANK, "ba_lora": LOW_RANK}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the logits' scale."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def is_data_driven(method: str) -> bool:
    return adapt.needs_calibration(method)


def exact_start(model: nn.Module) -> bool:
    return adapt.adapter_config(model).exact_start


def check_start(model: nn.Module, run, expected: torch.Tensor, tol: float = 1e-5,
                merge_tol: float = 1e-4) -> torch.Tensor:
    """The adapted model's output ``run(model)``: the base model's (``expected``) within ``tol``
    for an exact start, else finite and the output of the model merged into plain linears within
    ``merge_tol`` (the merge tests' tolerance)."""
    out = run(model)
    if exact_start(model):
        assert rel(out, expected) < tol
    else:
        assert bool(torch.isfinite(out).all())
        assert rel(run(adapt.merge(copy.deepcopy(model))), out) < merge_tol
    return out


@contextlib.contextmanager
def perturbed(model: nn.Module, seed: int = 0):
    """Add seeded noise (10% of each tensor's mean magnitude, 1e-2 for all-zero ones) to every
    trainable parameter, as training would; restore the values on exit."""
    params = adapt.trainable_parameters(model)
    saved = {k: p.detach().clone() for k, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(params):
            p = params[key]
            size = float(p.abs().mean())
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.add_((noise * (0.1 * size if size > 0 else 1e-2)).to(p.dtype))
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ptb_windows(smollm2):
    from slimtune.calib import calibration_windows

    _, tok = smollm2
    return calibration_windows(tok, "ptb", "train", n=3, seqlen=64, seed=0)


@pytest.fixture(scope="module")
def calib(ptb_windows):
    """2 x 64 PTB-train token windows for the data-driven methods."""
    return ptb_windows[:2]


@pytest.fixture(scope="module")
def train_batch(ptb_windows):
    """1 x 32 PTB-train tokens (not in ``calib``) for one optimiser step."""
    return ptb_windows[2:, :32]


@pytest.fixture(scope="module")
def text_ids(ptb_test_ids):
    """24 tokens of real text (PTB test)."""
    return ptb_test_ids[:24].unsqueeze(0)


@pytest.fixture(scope="module")
def base_logits(smollm2, text_ids):
    return logits(smollm2[0], text_ids)


# settings where the generic perturbation would barely move the output (AdaLoRA's PEFT init:
# P, Q ~ N(0, 0.02²) and Λ = 0, so a 1e-2 change of Λ moves ΔW ~60x less than LoRA's B;
# IncreLoRA starts from the same init)
PARAMS = {"adalora": {"alpha": 256.0}, "increlora": {"alpha": 256.0}}


def apply_method(model, method, calib, **kw):
    return adapt.apply(model, method, calib=calib if is_data_driven(method) else None,
                       progress=False, **{**PARAMS.get(method, {}), **kw})


@pytest.fixture(scope="module", params=METHODS)
def adapted(request, smollm2, calib):
    method = request.param
    model = apply_method(copy.deepcopy(smollm2[0]), method, calib, r=R, targets=FAST_TARGETS)
    return SimpleNamespace(method=method, model=model)


# -- the matrix --------------------------------------------------------------------------------
def check_trainable_set(method: str, model: nn.Module, targets) -> None:
    layers = factored_layers(model)
    assert sorted(layers) == sorted(model.slimtune_adapter["layers"])
    assert len(layers) == len(match_targets(model, targets, include_factored=True)) > 0
    trainable = set(adapt.trainable_parameters(model))
    for name, layer in layers.items():
        own = {k for k, p in layer.named_parameters() if p.requires_grad}
        assert own, f"{method}: {name} trains nothing"
        if method in TRAINABLE:
            assert own == TRAINABLE[method], f"{method}: {name} trains {sorted(own)}"
        else:  # generic: only adapter parts, never the base, the origin record or the bias
            assert all(k.split(".")[0] in ("lowrank", "transform", "sparse") for k in own), own
        trainable -= {f"{name}.{k}" for k in own}
    assert not trainable, f"{method}: parameters outside the adapter train: {sorted(trainable)[:4]}"


def test_start_equals_base_model(adapted, base_logits, text_ids):
    check_start(adapted.model, lambda m: logits(m, text_ids), base_logits)


def test_only_the_methods_parameters_train(adapted):
    check_trainable_set(adapted.method, adapted.model, FAST_TARGETS)


def test_merge_into_plain_linears_keeps_trained_outputs(adapted, base_logits, text_ids):
    with perturbed(adapted.model) as model:
        trained = logits(model, text_ids)
        merged = adapt.merge(copy.deepcopy(model))
    assert rel(trained, base_logits) > 1e-3  # the perturbation matters, so the check below does
    assert not factored_layers(merged) and merged.slimtune_adapter is None
    for name in match_targets(merged, FAST_TARGETS):
        assert type(merged.get_submodule(name)) is nn.Linear
    assert rel(logits(merged, text_ids), trained) < 1e-4


def test_factored_merge_unmerge_round_trip(adapted, text_ids):
    layers = factored_layers(adapted.model).values()
    bases = [None if layer.base is None else layer.base.weight.detach().clone()
             for layer in layers]
    with perturbed(adapted.model) as model:
        trained = logits(model, text_ids)
        try:
            for layer in layers:
                layer.merge()
            assert all(layer.merged for layer in layers)
            assert rel(logits(model, text_ids), trained) < 1e-4
        finally:
            for layer in layers:
                layer.unmerge()
        assert not any(layer.merged for layer in layers)
        assert [layer.base is None for layer in layers] == [w is None for w in bases]
        assert rel(logits(model, text_ids), trained) < 1e-5
    with torch.no_grad():  # unmerge restores the base up to round-off; undo that for the others
        for layer, weight in zip(layers, bases):
            if weight is not None:
                layer.base.weight.copy_(weight)


def test_save_load_restores_the_adapter(adapted, smollm2, text_ids, tmp_path):
    base = smollm2[0]
    with perturbed(adapted.model) as model:
        trained = logits(model, text_ids)
        path = adapt.save(model, tmp_path / "adapter")
    loaded = adapt.load(copy.deepcopy(base), path)
    assert rel(logits(loaded, text_ids), trained) < 1e-6
    assert sorted(adapt.trainable_parameters(loaded)) == sorted(
        adapt.trainable_parameters(adapted.model))
    assert adapt.adapter_config(loaded) == adapt.adapter_config(adapted.model)
    on_disk = sum(f.stat().st_size for f in path.iterdir())
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    # a layer without a base holds the weight itself (SST: a full SVD, up to twice its size)
    replaced = sum(layer.out_features * layer.in_features * 4
                   for layer in factored_layers(adapted.model).values() if layer.base is None)
    assert on_disk < 0.05 * model_bytes + 2 * replaced, f"{on_disk / 2**20:.1f} MB adapter"


def test_one_optimizer_step_changes_the_output(adapted, train_batch, text_ids):
    model = copy.deepcopy(adapted.model)  # after_step may change more than parameter values
    before = logits(model, text_ids)
    params = adapt.trainable_parameters(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-3, weight_decay=0.0)
    loss = model(train_batch, labels=train_batch).loss
    extra = adapt.extra_loss(model)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    grads = [p.grad for p in params.values() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(bool(g.abs().max() > 0) for g in grads)
    opt.step()
    adapt.after_step(model, 0)
    assert rel(logits(model, text_ids), before) > 1e-5


@pytest.fixture(scope="module")
def layer0_input(smollm2, text_ids):
    """The real input of layer 0's attention projections on the text."""
    model = smollm2[0].model
    with torch.no_grad():
        return model.layers[0].input_layernorm(model.embed_tokens(text_ids))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float64, 1e-10)])
@pytest.mark.parametrize("method", METHODS)
def test_dtype_is_kept(method, dtype, tol, smollm2, calib, text_ids, layer0_input):
    """A bfloat16 / float64 copy of layer 0's q_proj (inside the whole model for data-driven
    methods, which need token windows) stays in its dtype and starts at its output."""
    if is_data_driven(method):
        model, name = copy.deepcopy(smollm2[0]).to(dtype), ONE_LAYER
        run = lambda m: logits(m, text_ids)  # noqa: E731
    else:
        q_proj = smollm2[0].get_submodule(ONE_LAYER)
        model, name = nn.ModuleDict({"q_proj": copy.deepcopy(q_proj).to(dtype)}), "q_proj"
        x = layer0_input.to(dtype)
        run = lambda m: m["q_proj"](x).detach()  # noqa: E731
    expected = run(model)
    apply_method(model, method, calib[:1, :32], r=R, targets=[name])  # one short window: speed
    layer = model.get_submodule(name)
    assert isinstance(layer, FactoredLinear)
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    wrong = {k: t.dtype for k, t in tensors.items() if t.is_floating_point() and t.dtype != dtype}
    assert not wrong
    out = check_start(model, run, expected, tol, merge_tol=tol)
    assert out.dtype == dtype


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_all_linear_start_and_trainable_set(method, smollm2, calib, base_logits, text_ids):
    model = apply_method(copy.deepcopy(smollm2[0]), method, calib, r=R, targets="all-linear")
    assert len(factored_layers(model)) == 7 * model.config.num_hidden_layers
    check_trainable_set(method, model, "all-linear")
    check_start(model, lambda m: logits(m, text_ids), base_logits)


@pytest.fixture(scope="module")
def minilm_windows(minilm):
    from slimtune.calib import calibration_windows

    return calibration_windows(minilm[1], "ptb", "train", n=3, seqlen=32, seed=0)


@pytest.mark.parametrize("method", METHODS)
def test_encoder_with_biases_starts_merges_and_reloads(method, minilm, minilm_windows, tmp_path):
    """MiniLM (BERT encoder, every linear has a bias), all linears adapted."""
    base, windows = minilm[0], minilm_windows
    ids = windows[2:, :24]

    def hidden(model):
        with torch.no_grad():
            return model(ids).last_hidden_state

    expected = hidden(base)
    model = apply_method(copy.deepcopy(base), method, windows[:2], r=R, targets="all-linear")
    assert all(layer.bias is not None for layer in factored_layers(model).values())
    start = check_start(model, hidden, expected)
    with perturbed(model):
        trained = hidden(model)
        path = adapt.save(model, tmp_path / "adapter")
        merged = adapt.merge(copy.deepcopy(model))
    assert rel(trained, start) > 1e-3
    assert rel(hidden(merged), trained) < 1e-4
    assert rel(hidden(adapt.load(copy.deepcopy(base), path)), trained) < 1e-6
