"""The fine-tuning loop: schedule, accumulation, clipping, hooks, resume, classification."""
import copy
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from slimtune import adapt
from slimtune.adapt import registry
from slimtune.adapt.registry import make_config
from slimtune.train import (CausalLMTask, ClassificationTask, SequenceClassifier, WarmupCosine,
                            accumulate_gradients, make_train_config, optimizer_step, train,
                            warmup_cosine)
from slimtune.train.tasks import EpochOrder


# -- pure pieces ------------------------------------------------------------------------------
def test_warmup_then_cosine_values_are_exact():
    f = WarmupCosine(steps=10, warmup=4, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in range(4, 10):
        assert f(s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 6)),
                                     abs=1e-15)
    assert f(4) == 1.0 and f(7) == pytest.approx(0.55)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine(opt, 10, 4, 0.1)
    seen = []
    for _ in range(10):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * f(s) for s in range(10)], abs=1e-12)


def test_no_warmup_starts_at_full_lr_and_decays():
    f = WarmupCosine(steps=5)
    values = [f(s) for s in range(5)]
    assert values[0] == 1.0 and all(a > b > 0 for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("fields, message", [
    ({"data": "wikitext"}, "unknown data set 'wikitext'"),
    ({"data": "ptb", "steps": 0}, "steps"),
    ({"data": "ptb", "batch": 0}, "batch"),
    ({"data": "ptb", "lr": 0}, "lr"),
    ({"data": "ptb", "seqlen": 1}, "seqlen"),
    ({"data": "ptb", "steps": 3, "warmup": 4}, "warmup (4) exceeds steps (3)"),
    ({"data": "ptb", "eval_tokens": 100}, "eval_tokens"),
    ({"data": "finefoods", "seqlen": 600}, "512"),
    ({"data": "ptb", "learning_rate": 1e-3}, "learning_rate"),
    ({"data": "austen", "calib_data": "wiki"}, "unknown calibration text 'wiki'"),
])
def test_bad_settings_are_rejected_with_the_field_name(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_train_config(**fields)


def test_epoch_order_resumes_from_its_state():
    def make(g):
        return torch.randperm(7, generator=g)

    a = EpochOrder(make, seed=3)
    first = a.take(5)
    b = EpochOrder(make, seed=3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.take(9), b.take(9))
    assert sorted(torch.cat([first, EpochOrder(make, 3).take(7)[5:]]).tolist()) == list(range(7))


def test_train_refuses_an_existing_out_before_touching_the_model(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    config = make_train_config(data="austen", steps=1)
    with pytest.raises(FileExistsError, match="already exists"):
        train(object(), None, config, tmp_path / "run")


@pytest.mark.parametrize("method", [None, "lora"])
def test_calibration_data_for_a_method_without_calibration_is_refused(tmp_path, method):
    config = make_train_config(data="austen", steps=1, calib_data="ptb")
    adapter = None if method is None else make_config(method, r=2)
    with pytest.raises(ValueError, match="uses no calibration data"):
        train(object(), None, config, tmp_path / "run", adapter=adapter)


# -- SmolLM2 with LoRA ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_task(smollm2):
    """A fresh austen task (2 windows of 32 tokens per batch) on every call."""
    _, tok = smollm2
    return lambda seed=0: CausalLMTask(tok, "austen", seqlen=32, eval_tokens=64, seed=seed,
                                       eval_batch=2)


def small_config(**fields):
    base = dict(data="austen", steps=6, batch=2, seqlen=32, eval_tokens=64, lr=1e-3)
    return make_train_config(**{**base, **fields})


class FixedBatch:
    """A task that returns the same batch every step."""

    def __init__(self, task):
        self.task, self.batch = task, task.next_batch(2)

    def __getattr__(self, name):
        return getattr(self.task, name)

    def next_batch(self, n):
        return self.batch


def test_lora_loss_falls_on_a_fixed_batch(smollm2, lm_task, tmp_path):
    model = copy.deepcopy(smollm2[0])
    lora = make_config("lora", r=8, targets=r"model\.layers\.(1[5-9]|2[0-9])\..*")  # top half
    _, history = train(model, FixedBatch(lm_task()), small_config(steps=10),
                             tmp_path / "run", adapter=lora, progress=False)
    losses = [r["loss"] for r in history["steps"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert history["steps"][-1]["eval"]["perplexity"] > 1
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in history["steps"])
    written = json.loads((tmp_path / "run" / "history.json").read_text())
    assert written["finished"] and [r["loss"] for r in written["steps"]] == losses
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def two_layer_lora(smollm2):
    """SmolLM2 with LoRA on the last block's q/v projections (a short backward), B made
    non-zero so A has gradients too."""
    model = copy.deepcopy(smollm2[0])
    adapt.apply(model, "lora", r=4, targets=r"model\.layers\.29\.self_attn\.(q|v)_proj",
                progress=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapt.trainable_parameters(model).values():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model


def test_two_micro_batches_give_the_gradient_of_one_batch_of_two(two_layer_lora, lm_task):
    model, task = two_layer_lora, lm_task()
    batch = task.next_batch(2)
    halves = [{"input_ids": batch["input_ids"][i:i + 1]} for i in range(2)]
    params = list(adapt.trainable_parameters(model).values())
    assert len(params) == 4

    def grads(micro):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, task, micro)
        return loss, [p.grad.clone() for p in params]

    loss_one, g_one = grads([batch])
    loss_two, g_two = grads(halves)
    model.zero_grad(set_to_none=True)
    assert loss_two == pytest.approx(loss_one, rel=1e-5)
    for a, b in zip(g_one, g_two):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_clipping_caps_the_global_gradient_norm(two_layer_lora, lm_task):
    model, task = two_layer_lora, lm_task()
    params = list(adapt.trainable_parameters(model).values())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.0)  # lr 0: look at the gradients, keep the weights
    sched = warmup_cosine(opt, 1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))))
    accumulate_gradients(model, task, [task.next_batch(2)])
    norm = optimizer_step(params, opt, sched, max_grad_norm=1e-3)
    assert norm > 1e-3 and seen[0] == pytest.approx(1e-3, rel=1e-4)
    assert all(p.grad is None for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


class CrashAt:
    """Raise on the ``at``-th call of next_batch (1-based), like a killed job."""

    def __init__(self, task, at):
        self.task, self.at, self.calls = task, at, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def next_batch(self, n):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.task.next_batch(n)


def test_resume_after_a_crash_gives_the_uninterrupted_run(smollm2, lm_task, tmp_path):
    config = small_config(steps=5, warmup=2, save_every=2)
    lora = make_config("lora", r=4, targets=r"model\.layers\.2[6-9]\..*")  # short backward
    _, full = train(copy.deepcopy(smollm2[0]), lm_task(), config, tmp_path / "full",
                    adapter=lora, progress=False)
    with pytest.raises(KeyboardInterrupt):  # dies in step 4, after the checkpoint of step 2
        train(copy.deepcopy(smollm2[0]), CrashAt(lm_task(), 4), config, tmp_path / "cut",
              adapter=lora, progress=False)
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002"]
    saved = load_file(tmp_path / "cut" / "checkpoints" / ckpts[0] / "adapter" /
                      "adapter.safetensors")
    assert saved and not any(".base." in k for k in saved)  # the adapter only
    with pytest.raises(ValueError, match="lr"):
        train(copy.deepcopy(smollm2[0]), lm_task(), small_config(steps=5, warmup=2, lr=5e-4),
              tmp_path / "cut", adapter=lora, resume=True, progress=False)
    _, resumed = train(copy.deepcopy(smollm2[0]), lm_task(), config, tmp_path / "cut",
                       adapter=lora, resume=True, progress=False)
    assert resumed["resumed_at"] == [2]
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in resumed["steps"]] == pytest.approx(
            [r[key] for r in full["steps"]], rel=1e-5)
    a = load_file(tmp_path / "full" / "adapter.safetensors")
    b = load_file(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="finished"):
        train(copy.deepcopy(smollm2[0]), lm_task(), config, tmp_path / "cut", adapter=lora,
              resume=True, progress=False)


# -- hooks: the loop calls the method's hooks, whatever the method --------------------------------
def test_method_hooks_are_called_and_their_state_resumes(minilm, tmp_path):
    """loss, after_backward (gradients present), after_step (with the optimiser; method_state
    holds the run's length), finish; method_state comes back from a checkpoint."""
    calls = []

    def loss(model, config):
        return 0.0 * sum(p.sum() for p in adapt.trainable_parameters(model).values()) + 0.25

    def after_backward(model, config, step):
        assert all(p.grad is not None for p in adapt.trainable_parameters(model).values())
        calls.append(("backward", step))

    def after_step(model, config, step, optimizer):
        assert isinstance(optimizer, torch.optim.Optimizer)
        state = adapt.method_state(model)
        state["count"] = state.get("count", 0) + 1
        calls.append(("step", step, state["total_steps"]))

    def finish(model, config):
        calls.append(("finish", adapt.method_state(model)["count"]))

    lora = registry.get_method("lora")
    registry.METHODS.register("hooked", registry.AdapterConfig, init_layer=lora.hook("init_layer"),
                              loss=loss, after_backward=after_backward, after_step=after_step,
                              finish=finish)
    encoder, tok = minilm
    task = lambda: ClassificationTask(tok, "finefoods", seqlen=32, eval_examples=8)  # noqa: E731
    config = make_train_config(data="finefoods", steps=3, batch=2, seqlen=32, eval_examples=8,
                               save_every=2)
    adapter = make_config("hooked", r=2)
    try:
        _, history = train(copy.deepcopy(encoder), task(), config, tmp_path / "run",
                           adapter=adapter, progress=False)
        assert calls == [("backward", 0), ("step", 1, 3), ("backward", 1), ("step", 2, 3),
                         ("backward", 2), ("step", 3, 3), ("finish", 3)]
        assert [r["extra_loss"] for r in history["steps"]] == [0.25] * 3
        calls.clear()
        with pytest.raises(KeyboardInterrupt):  # dies in step 3, after the step-2 checkpoint
            train(copy.deepcopy(encoder), CrashAt(task(), 3), config, tmp_path / "cut",
                  adapter=adapter, progress=False)
        calls.clear()
        train(copy.deepcopy(encoder), task(), config, tmp_path / "cut", adapter=adapter,
              resume=True, progress=False)
    finally:
        registry.METHODS.unregister("hooked")
    assert calls == [("backward", 2), ("step", 3, 3), ("finish", 3)]  # count 2 came back


@pytest.mark.parametrize("calib_data", [None, "ptb"])
def test_data_driven_methods_calibrate_on_calib_data(smollm2, lm_task, monkeypatch, tmp_path,
                                                     calib_data):
    """CorDA's kpm collects the knowledge to keep: calib_data replaces the training text."""
    from slimtune.calib import calibration_windows
    from slimtune.train import loop

    seen = {}

    def record(model, method, calib=None, **kwargs):
        seen["calib"] = calib
        raise RuntimeError("recorded")

    monkeypatch.setattr(loop.adapt, "apply", record)
    config = small_config(calib_n=3, calib_data=calib_data)
    with pytest.raises(RuntimeError, match="recorded"):
        train(copy.deepcopy(smollm2[0]), lm_task(), config, tmp_path / "run",
              adapter=make_config("corda", r=2, mode="kpm"), progress=False)
    expected = calibration_windows(smollm2[1], calib_data or "austen", "train", n=3, seqlen=32,
                                   seed=0)
    assert torch.equal(seen["calib"], expected)


# -- MiniLM: finefoods classification ---------------------------------------------------------
def test_minilm_finefoods_lora_trains_the_head_and_reloads(minilm, tmp_path):
    encoder, tok = minilm
    config = make_train_config(data="finefoods", steps=4, batch=4, seqlen=48, lr=1e-3,
                               eval_examples=16)
    task = ClassificationTask(tok, "finefoods", seqlen=48, eval_examples=16)
    initial_head = SequenceClassifier(copy.deepcopy(encoder), 2, seed=0).head.weight.detach()
    model, history = train(copy.deepcopy(encoder), task, config, tmp_path / "run",
                           adapter=make_config("lora", r=4), progress=False)
    assert model.head.weight.requires_grad and model.head.bias.requires_grad
    changed = model.head.weight.detach() != initial_head  # (a few pooled features are 0)
    assert changed.float().mean() > 0.95 and model.head.bias.abs().min() > 0
    assert type(model.encoder.pooler.dense).__name__ == "FactoredLinear"
    accuracy = history["final_eval"]["accuracy"]
    assert 0 <= accuracy <= 1 and history["final_eval"]["n"] == 16
    manifest = adapt.read_manifest(tmp_path / "run")
    assert {"head.weight", "head.bias"} <= set(manifest["trainable"])

    fresh = SequenceClassifier(copy.deepcopy(encoder), 2, seed=123)  # different head init
    adapt.load(fresh, tmp_path / "run").eval()
    batch = task.next_batch(4)
    batch.pop("labels")
    model.eval()
    torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("optimizer, params", [
    ("adamw", {}), ("galore", {"rank": 8, "update_proj_gap": 2}), ("lion", {}),
    ("asam", {"rho": 0.5})])
def test_minilm_full_finetuning_resumes_exactly_with_dropout(minilm, tmp_path, optimizer,
                                                             params):
    """Full fine-tuning (every parameter trains); dropout is on, so the RNG state must resume;
    with every kind of optimiser (GaLore's projector refreshes at steps 0 and 2: the resumed run
    refreshes at the checkpointed step count; ASAM takes its second gradient through the
    loop's closure, with dropout drawing anew)."""
    encoder, tok = minilm
    config = make_train_config(data="finefoods", steps=3, batch=2, seqlen=32, lr=1e-4,
                               eval_examples=8, save_every=2, optimizer=optimizer,
                               optimizer_params=params)

    def task():
        return ClassificationTask(tok, "finefoods", seqlen=32, eval_examples=8)

    model, full = train(copy.deepcopy(encoder), task(), config, tmp_path / "full",
                        progress=False)
    assert full["mode"] == "full" and full["trainable_parameters"] == full["parameters"]
    assert not (model.encoder.embeddings.word_embeddings.weight
                == encoder.embeddings.word_embeddings.weight).all()
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(encoder), CrashAt(task(), 3), config, tmp_path / "cut",
              progress=False)
    _, resumed = train(copy.deepcopy(encoder), task(), config, tmp_path / "cut", resume=True,
                       progress=False)
    assert [r["loss"] for r in resumed["steps"]] == pytest.approx(
        [r["loss"] for r in full["steps"]], rel=1e-5)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("full", "cut"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
