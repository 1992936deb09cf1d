"""The one-forward-per-block order (``sequential="layer"``, slimtune.calib.staged) on real SmolLM2."""
import copy


import pytest
import torch

from slimtune.calib import LayerStats, calibration_windows, choose_sequential, run_pipeline
from slimtune.compress import build_steps, load_recipe
from slimtune.calib.staged import _Gate
from slimtune.targets import replace_linears
from test_pipeline import Identity, perturbed, reference_stats, rel


@pytest.fixture(scope="module")
def windows(smollm2):
    return calibration_windows(smollm2[1], "ptb", "valid", n=3, seqlen=64, seed=4)


class Perturb(Identity):
    def apply(self, name, layer, stats):
        super().apply(name, layer, stats)
        return perturbed(name, layer)


def no_gates(model):
    return not any(isinstance(m, _Gate) for m in model.modules())


@pytest.mark.parametrize("sequential", ["layer", "block"])
def test_statistics_come_from_the_compressed_earlier_layers_of_the_block(smollm2, windows,
                                                                          sequential):
    original = smollm2[0]
    step = Perturb(["q_proj", "k_proj", "v_proj", "o_proj"])
    model = copy.deepcopy(original)
    report = run_pipeline(model, windows, [step], batch_size=2, progress=False,
                          sequential=sequential)
    assert report["sequential"] == sequential and report["forward_seconds"] > 0
    assert len(report["steps"][0]["replaced"]) == 120 and no_gates(model)
    whole = copy.deepcopy(original)
    replace_linears(whole, ["q_proj", "k_proj", "v_proj", "o_proj"], perturbed)
    with torch.no_grad():  # the step ignores its statistics: both orders give the same model
        got, want = (m(windows, use_cache=False).logits for m in (model, whole))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # o_proj reads attention over q/k/v of its own block: compressed ones in "layer" order only
    name = "model.layers.3.self_attn.o_proj"
    final = reference_stats(model, windows, [name], batch_size=2)[name].gram()
    partly = copy.deepcopy(original)  # blocks < 3 compressed, block 3 as it was
    replace_linears(partly, r"model\.layers\.[0-2]\.self_attn\.[qkvo]_proj", perturbed)
    before = reference_stats(partly, windows, [name], batch_size=2)[name].gram()
    seen = step.seen[name]["gram"]
    if sequential == "layer":
        assert rel(seen, final) < 1e-6 and rel(seen, before) > 1e-3
    else:
        assert rel(seen, before) < 1e-6 and rel(seen, final) > 1e-3
    # q_proj's input depends only on earlier blocks: the same in both orders
    name = "model.layers.3.self_attn.q_proj"
    ref = reference_stats(model, windows, [name], batch_size=2)[name].gram()
    assert rel(step.seen[name]["gram"], ref) < 1e-6


def test_layer_order_applies_every_step_of_a_layer_in_recipe_order(smollm2, windows):
    model = copy.deepcopy(smollm2[0])
    events = []

    class Record(Identity):
        def __init__(self, tag, targets, needs=("gram",)):
            super().__init__(targets, needs)
            self.tag = tag

        def apply(self, name, layer, stats: LayerStats):
            events.append((self.tag, name.split(".", 2)[2], stats.inputs is None))
            return super().apply(name, layer, stats)

    steps = [Record("a", r"model\.layers\.0\..*_proj"), Record("b", ["o_proj", "down_proj"]),
             Record("c", r"model\.layers\.0\.mlp\..*", needs=())]
    run_pipeline(model, windows, steps, batch_size=2, progress=False)
    block0 = [e for e in events if e[1].startswith("0.")]
    assert block0 == [("a", "0.self_attn.q_proj", False), ("a", "0.self_attn.k_proj", False),
                      ("a", "0.self_attn.v_proj", False), ("a", "0.self_attn.o_proj", False),
                      ("b", "0.self_attn.o_proj", False), ("a", "0.mlp.gate_proj", False),
                      ("c", "0.mlp.gate_proj", True), ("a", "0.mlp.up_proj", False),
                      ("c", "0.mlp.up_proj", True), ("a", "0.mlp.down_proj", False),
                      ("b", "0.mlp.down_proj", False), ("c", "0.mlp.down_proj", True)]
    # steps of one layer get the same statistics object
    assert steps[0].seen["model.layers.0.self_attn.o_proj"]["n_tokens"] == windows.numel()
    torch.testing.assert_close(steps[0].seen["model.layers.0.mlp.down_proj"]["gram"],
                               steps[1].seen["model.layers.0.mlp.down_proj"]["gram"])
    # only "gram" is needed: no sum |x| pass (sum x^2 is the Gram's diagonal)
    assert steps[0].seen["model.layers.0.mlp.down_proj"]["mean_abs"] is None


def test_an_error_in_a_step_or_in_the_block_stops_cleanly(smollm2, windows):
    model = copy.deepcopy(smollm2[0])

    class Fails(Identity):
        def apply(self, name, layer, stats):
            if name == "model.layers.2.mlp.up_proj":
                raise ValueError("cannot do this one")
            return super().apply(name, layer, stats)

    with pytest.raises(ValueError, match=r"step 0 \(Fails\) on model\.layers\.2\.mlp\.up_proj"):
        run_pipeline(model, windows, [Fails()], batch_size=1, progress=False)
    assert no_gates(model)

    norm = model.model.layers[4].post_attention_layernorm
    norm.forward = lambda x: (_ for _ in ()).throw(RuntimeError("broken norm"))
    with pytest.raises(RuntimeError, match="broken norm"):
        run_pipeline(model, windows, [Identity()], batch_size=1, progress=False)
    assert no_gates(model)
    with pytest.raises(ValueError, match="sequential must be"):
        run_pipeline(model, windows, [Identity()], progress=False, sequential="token")


@pytest.mark.parametrize("sequential", ["layer", "block"])
def test_blocks_after_the_last_one_needing_inputs_run_no_forward(smollm2, windows, sequential):
    model = copy.deepcopy(smollm2[0])
    calls = [0] * len(model.model.layers)
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(model.model.layers)]
    data_free = Identity(needs=())
    run_pipeline(model, windows, [data_free], batch_size=2, progress=False, sequential=sequential)
    assert calls == [0] * len(calls) and len(data_free.seen) == 210
    assert all(v is None for v in data_free.seen.values())

    early = Identity(r"model\.layers\.[01]\..*_proj", needs=("gram",))
    data_free = Identity(needs=())
    report = run_pipeline(model, windows, [early, data_free], batch_size=2, progress=False,
                          sequential=sequential)
    batches = -(-len(windows) // 2)
    ran = [c // batches for c in calls]  # block forwards per block
    assert ran[2:] == [0] * (len(calls) - 2) and ran[1] >= 1 and ran[0] >= 1
    assert len(data_free.seen) == 210 and len(early.seen) == 14
    assert early.seen["model.layers.1.mlp.down_proj"]["n_tokens"] == windows.numel()
    assert report["steps"][1]["layers"][-1] == "model.layers.29.mlp.down_proj"
    for h in handles:
        h.remove()


def test_the_default_order_is_block_when_a_step_reading_inputs_asks_for_it(smollm2, windows):
    block_step = Identity(r"model\.layers\.0\..*_proj", needs=("gram",))
    block_step.sequential = "block"
    data_free = Identity(needs=())
    data_free.sequential = "block"  # reads no statistics: its wish does not matter
    assert choose_sequential([Identity()]) == "layer"
    assert choose_sequential([data_free, Identity()]) == "layer"
    assert choose_sequential([Identity(), block_step]) == "block"
    bad = Identity()
    bad.sequential = "token"
    with pytest.raises(ValueError, match="sequential must be one of"):
        choose_sequential([bad])
    report = run_pipeline(copy.deepcopy(smollm2[0]), windows, [block_step], batch_size=2,
                          progress=False)
    assert report["sequential"] == "block"
    report = run_pipeline(copy.deepcopy(smollm2[0]), windows, [block_step], batch_size=2,
                          progress=False, sequential="layer")  # an explicit order wins
    assert report["sequential"] == "layer"
    # the registered steps: SparseGPT asks for the block order (BENCHMARKS.md), the rest do not
    steps = build_steps(load_recipe(
        [{"method": m, "targets": "all-linear", "sparsity": 0.5} for m in ("sparsegpt", "wanda")]
        + [{"method": "gptq", "targets": "all-linear", "bits": 4}]))
    assert [getattr(s, "sequential", "layer") for s in steps] == ["block", "layer", "layer"]
    assert choose_sequential(steps[1:]) == "layer" and choose_sequential(steps) == "block"
