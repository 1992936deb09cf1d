"""The layer-by-layer calibration pipeline on the real models (short windows to stay cheap)."""
import copy
import zlib

import pytest
import torch
from torch import nn

from slimtune.data import load_text
from slimtune.evaluate import tokenize_text
from slimtune.layers import FactoredLinear, LowRank
from slimtune.targets import replace_linears
from slimtune.calib import (LayerStats, UnsupportedArchitectureError, calibration_windows,
                               find_blocks, fisher_diagonals, run_pipeline)
from slimtune.calib.blocks import keep_heap, trim_heap
from slimtune.weights.stats import InputStatistics


@pytest.fixture(scope="module")
def lm_windows(smollm2):
    return calibration_windows(smollm2[1], "ptb", "valid", n=4, seqlen=64, seed=1)


@pytest.fixture(scope="module")
def bert_windows(minilm):
    return calibration_windows(minilm[1], "ptb", "valid", n=4, seqlen=32, seed=2)


class Identity:
    """Returns each layer unchanged; records what it was given."""

    def __init__(self, targets="all-linear", needs=("gram", "mean_abs")):
        self.targets, self.needs, self.seen = targets, frozenset(needs), {}

    def apply(self, name, layer, stats: LayerStats):
        inp = stats.inputs
        self.seen[name] = None if inp is None else {
            "gram": None if inp.gram_sum is None else inp.gram().clone(),
            "mean_abs": None if inp.abs_sum is None else inp.mean_abs().clone(),
            "n_tokens": inp.n_tokens}
        return layer


def reference_stats(model, windows, names, batch_size):
    """Input statistics from hooks on one ordinary full-model forward."""
    stats, handles = {}, []
    for name in names:
        layer = model.get_submodule(name)
        stats[name] = st = InputStatistics(layer.in_features)
        handles.append(layer.register_forward_pre_hook(lambda m, a, st=st: st.update(a[0])))
    try:
        with torch.no_grad():
            for s in range(0, len(windows), batch_size):
                model(input_ids=windows[s:s + batch_size])
    finally:
        for h in handles:
            h.remove()
    return stats


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_find_blocks(smollm2, minilm):
    path, blocks = find_blocks(smollm2[0])
    assert path == "model.layers" and len(blocks) == 30
    path, blocks = find_blocks(minilm[0])
    assert path == "encoder.layer" and len(blocks) == 6

    class Net(nn.Module):  # generic search: the repeated blocks under an unusual name
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.ReLU(), nn.Tanh()])
            self.stack = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU())
                                        for _ in range(3)])

    assert find_blocks(Net())[0] == "stack"
    with pytest.raises(UnsupportedArchitectureError, match="nn.ModuleList") as err:
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert isinstance(err.value, ValueError) and "Sequential" in str(err.value)


def test_calibration_windows(smollm2, lm_windows):
    tok = smollm2[1]
    again = calibration_windows(tok, "ptb", "valid", n=4, seqlen=64, seed=1)
    assert lm_windows.shape == (4, 64) and lm_windows.dtype == torch.long
    assert torch.equal(lm_windows, again)
    assert not torch.equal(lm_windows, calibration_windows(tok, "ptb", "valid", 4, 64, seed=2))
    ids = tokenize_text(tok, load_text("ptb", "valid")).tolist()
    starts = []
    for w in lm_windows.tolist():  # each window is a contiguous piece of the split
        hits = [i for i in range(len(ids) - 63) if ids[i] == w[0] and ids[i:i + 64] == w]
        assert hits
        starts.append(hits[0])
    starts.sort()
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))  # non-overlapping
    with pytest.raises(ValueError, match="n="):
        calibration_windows(tok, "ptb", "valid", n=10 ** 6, seqlen=64)


def test_identity_pipeline_keeps_smollm2_logits(smollm2, lm_windows):
    model, lm_windows = copy.deepcopy(smollm2[0]), lm_windows[:3]
    with torch.no_grad():
        before = model(lm_windows, use_cache=False).logits
    step = Identity()
    report = run_pipeline(model, lm_windows, [step], batch_size=3, progress=False)
    with torch.no_grad():
        after = model(lm_windows, use_cache=False).logits
    assert torch.equal(before, after)
    assert len(report["steps"][0]["layers"]) == 210 and report["steps"][0]["replaced"] == []
    assert report["blocks"] == "model.layers" and report["peak_rss_mb"] > 0
    assert all(v["n_tokens"] == 3 * 64 for v in step.seen.values())


@pytest.mark.parametrize("sequential", ["layer", "block"])
@pytest.mark.parametrize("which", ["smollm2", "minilm"])
def test_statistics_equal_full_forward_hooks(which, sequential, request, lm_windows, bert_windows):
    model = copy.deepcopy(request.getfixturevalue(which)[0])
    windows = lm_windows if which == "smollm2" else bert_windows
    names = (["model.layers.0.self_attn.q_proj", "model.layers.14.self_attn.o_proj",
              "model.layers.29.mlp.down_proj"] if which == "smollm2" else
             ["encoder.layer.0.attention.self.query", "encoder.layer.3.attention.output.dense",
              "encoder.layer.5.output.dense"])
    ref = reference_stats(model, windows, names, batch_size=3)
    gram_step, abs_step = Identity(names), Identity(names, needs=("mean_abs",))
    run_pipeline(model, windows, [gram_step, abs_step], batch_size=3, progress=False,
                 sequential=sequential)
    for name in names:
        got, want = gram_step.seen[name], ref[name]
        assert got["n_tokens"] == want.n_tokens == windows.numel()
        assert rel(got["gram"], want.gram()) < 1e-6
        assert rel(got["mean_abs"], want.mean_abs()) < 1e-6
        if sequential == "block":  # "mean_abs" alone: no Gram matrix tracked
            assert abs_step.seen[name]["gram"] is None
        else:  # one statistics object serves both steps of the layer
            assert rel(abs_step.seen[name]["gram"], want.gram()) < 1e-6
        assert rel(abs_step.seen[name]["mean_abs"], want.mean_abs()) < 1e-6


def test_two_pass_protocol_measures_everything_before_applying(smollm2, lm_windows):
    model = copy.deepcopy(smollm2[0])
    events = []

    class TwoPass(Identity):
        def measure(self, name, layer, stats):
            assert isinstance(layer, nn.Linear) and stats.inputs.n_tokens == 2 * 64
            events.append(("measure", name))

        def allocate(self):
            events.append(("allocate", None))

        def apply(self, name, layer, stats):
            events.append(("apply", name))
            return super().apply(name, layer, stats)

    run_pipeline(model, lm_windows[:2], [TwoPass(["q_proj", "down_proj"])], progress=False)
    kinds = [k for k, _ in events]
    assert kinds == ["measure"] * 60 + ["allocate"] + ["apply"] * 60
    names = [f"model.layers.{i}.{p}" for i in range(30)
             for p in ("self_attn.q_proj", "mlp.down_proj")]
    assert [n for k, n in events if k == "measure"] == names
    assert [n for k, n in events if k == "apply"] == names


def perturbed(name, linear):
    """A FactoredLinear: the layer plus a random (name-seeded) rank-8 perturbation."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    scale = float(linear.weight.detach().std()) * 0.5
    A = torch.randn(8, linear.in_features, generator=g) / linear.in_features ** 0.5
    B = torch.randn(linear.out_features, 8, generator=g) * scale
    return FactoredLinear.from_linear(copy.deepcopy(linear), lowrank=LowRank(A, B))


def test_block_outputs_are_recomputed_after_compression(smollm2, lm_windows):
    original, lm_windows = smollm2[0], lm_windows[:3]

    class Perturb(Identity):
        def apply(self, name, layer, stats):
            super().apply(name, layer, stats)
            return perturbed(name, layer)

    step = Perturb(["q_proj", "o_proj"])
    model = copy.deepcopy(original)
    report = run_pipeline(model, lm_windows, [step], batch_size=2, progress=False)
    assert len(report["steps"][0]["replaced"]) == 60
    whole = copy.deepcopy(original)
    replace_linears(whole, ["q_proj", "o_proj"], perturbed)
    with torch.no_grad():
        got, want = (m(lm_windows, use_cache=False).logits for m in (model, whole))
        base = original(lm_windows, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-2  # the perturbation matters
    del whole
    # q_proj's input depends only on earlier blocks: the pipeline must have seen the compressed ones
    names = ["model.layers.1.self_attn.q_proj", "model.layers.29.self_attn.q_proj"]
    compressed = reference_stats(model, lm_windows, names, batch_size=2)
    uncompressed = reference_stats(original, lm_windows, names, batch_size=2)
    for name in names:
        assert rel(step.seen[name]["gram"], compressed[name].gram()) < 1e-6
        assert rel(step.seen[name]["gram"], uncompressed[name].gram()) > 1e-4


def test_block_order_statistics_pass_stops_after_the_last_hooked_input(smollm2, lm_windows):
    """In "block" order a statistics pass needs no block output: each batch stops once every
    hooked layer has had its input, so the layers after it run in the outputs pass only."""
    model = copy.deepcopy(smollm2[0])
    ran = {"q_proj": 0, "o_proj": 0, "down_proj": 0}
    for kind, path in (("q_proj", "self_attn.q_proj"), ("o_proj", "self_attn.o_proj"),
                       ("down_proj", "mlp.down_proj")):  # forward hooks: the layer really ran
        model.get_submodule("model.layers.0." + path).register_forward_hook(
            lambda m, a, out, kind=kind: ran.__setitem__(kind, ran[kind] + 1))
    batches = -(-len(lm_windows) // 2)
    down = "model.layers.0.mlp.down_proj"
    ref = reference_stats(copy.deepcopy(smollm2[0]), lm_windows, [down], batch_size=2)
    # blocks 0 and 1 targeted: block 0 runs a statistics pass and an outputs pass
    step = Identity(r"model\.layers\.[01]\..*_proj", needs=("gram",))
    run_pipeline(model, lm_windows, [step], batch_size=2, progress=False, sequential="block")
    assert ran == {"q_proj": 2 * batches, "o_proj": 2 * batches, "down_proj": batches}
    assert rel(step.seen[down]["gram"], ref[down].gram()) < 1e-6
    ran.update(dict.fromkeys(ran, 0))
    step = Identity(r"model\.layers\.[01]\.self_attn\.[qo]_proj", needs=("gram",))
    run_pipeline(model, lm_windows, [step], batch_size=2, progress=False, sequential="block")
    assert ran == {"q_proj": 2 * batches, "o_proj": batches, "down_proj": batches}
    assert step.seen["model.layers.0.self_attn.o_proj"]["n_tokens"] == lm_windows.numel()


def test_identity_pipeline_keeps_minilm_outputs(minilm, bert_windows):
    model = copy.deepcopy(minilm[0])
    with torch.no_grad():
        before = model(bert_windows).last_hidden_state
    report = run_pipeline(model, bert_windows, [Identity()], batch_size=3, progress=False)
    with torch.no_grad():
        after = model(bert_windows).last_hidden_state
    assert torch.equal(before, after)
    assert report["blocks"] == "encoder.layer" and len(report["steps"][0]["layers"]) == 36


def test_fisher_diagonals(smollm2, minilm, lm_windows):
    model = copy.deepcopy(smollm2[0])
    windows = lm_windows[:2, :32]
    names = ["model.layers.0.self_attn.k_proj", "model.layers.20.mlp.up_proj"]
    flags = [p.requires_grad for p in model.parameters()]
    fisher = fisher_diagonals(model, windows, names, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    name = names[0]
    weight = model.get_submodule(name).weight
    manual = torch.zeros_like(weight)
    for w in windows:  # batch_size=1: the mean over windows of each window's grad²
        loss = model(input_ids=w[None], labels=w[None], use_cache=False).loss
        manual += torch.autograd.grad(loss, weight)[0].square() / len(windows)
    for n in names:
        f = fisher[n]
        assert f.shape == model.get_submodule(n).weight.shape
        assert torch.isfinite(f).all() and (f >= 0).all() and (f > 0).float().mean() > 0.9
    torch.testing.assert_close(fisher[name], manual, rtol=1e-4, atol=1e-12)

    class FisherStep(Identity):
        def apply(self, name, layer, stats):
            assert stats.inputs is None
            self.seen[name] = stats.fisher
            return layer

    step = FisherStep([name], needs=("fisher",))
    run_pipeline(model, windows, [step], progress=False)
    torch.testing.assert_close(step.seen[name], fisher[name])
    with pytest.raises(ValueError, match="causal LM"):
        fisher_diagonals(minilm[0], windows, ["encoder.layer.0.output.dense"], progress=False)
    with pytest.raises(ValueError, match="causal LM"):
        run_pipeline(minilm[0], windows, [Identity(needs=("fisher",))], progress=False)


def test_heap_is_kept_during_the_walk_or_trimmed_after_every_block(smollm2, lm_windows,
                                                                    monkeypatch):
    import slimtune.calib.pipeline as pipeline

    trims, keeps = [], []
    monkeypatch.setattr(pipeline, "trim_heap", lambda: trims.append(1) or True)
    monkeypatch.setattr(pipeline, "keep_heap", lambda: keeps.append(1) or True)
    model = copy.deepcopy(smollm2[0])
    run_pipeline(model, lm_windows[:2], [Identity()], progress=False)  # default: "trim"
    assert (len(keeps), len(trims)) == (0, 30)
    run_pipeline(model, lm_windows[:2], [Identity()], progress=False, heap="keep")
    assert (len(keeps), len(trims)) == (1, 31)  # kept for the walk, handed back once at the end
    run_pipeline(model, lm_windows[:2], [Identity()], progress=False, heap="default")
    assert (len(keeps), len(trims)) == (1, 31)
    with pytest.raises(ValueError, match="heap must be"):
        run_pipeline(model, lm_windows[:2], [Identity()], progress=False, heap="mmap")
    assert keep_heap() and trim_heap()  # glibc takes both (Linux)


def test_bad_steps_raise_before_work(smollm2):
    model, windows = smollm2[0], torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"step 1 \(Identity\).*no_such_proj"):
        run_pipeline(model, windows, [Identity(), Identity(["no_such_proj"])], progress=False)
    with pytest.raises(ValueError, match="step 0.*inside the blocks"):
        run_pipeline(model, windows, [Identity(["lm_head"])], progress=False)
    with pytest.raises(ValueError, match=r"step 1 \(Identity\).*regex"):
        run_pipeline(model, windows, [Identity(), Identity("q_proj[")], progress=False)
    with pytest.raises(ValueError, match="step 0.*unknown needs"):
        run_pipeline(model, windows, [Identity(needs=("hessian",))], progress=False)


class RecordObjects:
    """Keeps the statistics object each layer receives (to check sharing)."""

    def __init__(self, targets):
        self.targets, self.needs, self.objects = targets, frozenset({"gram"}), {}

    def apply(self, name, layer, stats: LayerStats):
        self.objects[name] = stats.inputs
        return layer


def test_layers_fed_the_same_tensor_share_one_statistics_object(smollm2, lm_windows):
    model = copy.deepcopy(smollm2[0])
    step = RecordObjects(r"model\.layers\.(0|7)\..*")
    run_pipeline(model, lm_windows, [step], batch_size=3, progress=False)
    for i in (0, 7):
        o = {k.rsplit(".", 1)[1]: v for k, v in step.objects.items() if f".{i}." in k}
        assert o["q_proj"] is o["k_proj"] is o["v_proj"]
        assert o["gate_proj"] is o["up_proj"]
        assert len({id(v) for v in o.values()}) == 4  # qkv, o, gate/up, down
        assert o["q_proj"].n_tokens == o["down_proj"].n_tokens == lm_windows.numel()


def test_sample_windows_is_seeded_distinct_and_offset_on_request():
    from slimtune.calib import sample_windows

    ids = torch.arange(1000)
    w = sample_windows(ids, 5, 64, seed=3)
    assert torch.equal(w, sample_windows(ids, 5, 64, seed=3)) and w.shape == (5, 64)
    starts = sorted(int(r[0]) for r in w)
    assert all(torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 64)) for r in w)  # contiguous
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))  # non-overlapping
    aligned = sample_windows(ids, 15, 64, seed=3, random_offset=False)
    assert all(int(r[0]) % 64 == 0 for r in aligned)  # slots start at 0 without the offset
    with pytest.raises(ValueError, match=r"from reviews \(1000 tokens\); got n=16"):
        sample_windows(ids, 16, 64, source="reviews")
