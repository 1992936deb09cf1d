"""Merging adapters: slimtune and PEFT LoRA directories read as exact weight updates, factored
merges equal to the densified ones, outputs that slimtune and PEFT (in a process without
slimtune) load, TIES over the whole task vector, chunked streaming, and bad adapter inputs."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from slimtune import adapt
from slimtune.export.peft import to_peft
from slimtune.io.adapter_files import read_adapter
from slimtune.merge import merge_deltas, merge_lora
from slimtune.merge import dense as dense_merge
from slimtune.merge.models import merge_models
from slimtune.models import load_model, resolve_model_dir


def adapted(method, r, seed, **params):
    model, _ = load_model("minilm-l6")
    adapt.apply(model, method, r=r, alpha=2 * r, targets=["query", "value", "dense"], seed=seed,
                progress=False, **params)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():  # as if trained: B away from its zero start
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three MiniLM adapters of ranks 4, 2 and 3: slimtune LoRA, slimtune PiSSA (a base-changing
    init) and a PEFT export; and the dense weights each one's loaded model has."""
    root = tmp_path_factory.mktemp("adapters")
    dirs, dense = [], []
    for i, (method, r, fmt) in enumerate((("lora", 4, "slimtune"), ("pissa", 2, "slimtune"),
                                          ("lora", 3, "peft"))):
        model = adapted(method, r, seed=i)
        d = root / f"{method}{i}-{fmt}"
        adapt.save(model, d) if fmt == "slimtune" else to_peft(model, d)
        dirs.append(d)
        dense.append({k: v.clone() for k, v in adapt.merge(model).state_dict().items()})
    return dirs, dense


def base_state():
    return load_file(str(resolve_model_dir("minilm-l6") / "model.safetensors"))


def spec(method, dirs, weights=(1.0, 0.5, 2.0), **params):
    return {"method": method, "base": "minilm-l6", **params,
            "models": [{"path": str(d), "weight": w} for d, w in zip(dirs, weights)]}


def test_adapters_read_as_the_weights_their_loaded_models_have(adapters):
    dirs, dense = adapters
    base = base_state()
    for d, want in zip(dirs, dense):
        updates = read_adapter(d)
        assert updates.layers and not updates.full
        for name, (B, A) in updates.layers.items():
            w = f"{name}.weight"
            torch.testing.assert_close(base[w] + B @ A, want[w], rtol=0, atol=2e-6)
    assert read_adapter(dirs[1]).layers["encoder.layer.0.attention.self.query"][1].shape[0] == 4


@pytest.mark.parametrize("method, params", [("linear", {}), ("task_arithmetic", {"lambda": 0.7}),
                                            ("flora", {}), ("knots", {"density": 0.5}),
                                            ("knots", {"then": "linear"})])
def test_factored_merge_equals_the_densified_merge(adapters, tmp_path, method, params):
    dirs, _ = adapters
    factored = merge_models(spec(method, dirs, **params), tmp_path / "a", progress=False)
    dense = merge_models(spec(method, dirs, output="model", **params), tmp_path / "m",
                         progress=False)
    assert (factored / "adapter.json").is_file() and (factored / "adapter_config.json").is_file()
    assert not (factored / "model.safetensors").exists()
    merged, base = load_file(str(dense / "model.safetensors")), base_state()
    updates = read_adapter(factored).layers
    assert len(updates) == 6 * 5 + 1  # query, value and three "dense" per block; the pooler
    for name, (B, A) in updates.items():
        w = f"{name}.weight"
        got, want = B @ A, merged[w] - base[w]
        if method == "knots" and params.get("then", "ties") == "ties":
            # the two bases agree to float32 rounding, and a top-k trim is discontinuous at its
            # threshold: a few coordinates right at it may be kept by one path only
            assert (got - want).norm() <= 1e-2 * want.norm()
            # (0.25% of the coordinates on an AVX512 AMD EPYC, under 0.2% on earlier CPUs)
            assert ((got - want).abs() > 2e-5).float().mean() < 5e-3
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    untouched = "encoder.layer.0.attention.self.key.weight"
    assert torch.equal(merged[untouched], base[untouched])


def test_flora_stacks_ranks_exactly(adapters):
    dirs, _ = adapters
    layer = "encoder.layer.2.attention.self.value"
    factors = [read_adapter(d).layers[layer] for d in dirs]
    B, A = merge_lora("flora", factors, [1.0, 0.5, 2.0])
    assert B.shape[1] == 4 + 4 + 3  # PiSSA's update on the original weight has rank r + r0
    want = sum(w * b @ a for w, (b, a) in zip((1.0, 0.5, 2.0), factors)) / 3.5
    torch.testing.assert_close(B @ A, want, rtol=0, atol=1e-6)


def test_lora_lego_with_one_cluster_per_unit_is_the_weighted_mean_and_has_the_asked_rank():
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(12, r, generator=g), torch.randn(r, 9, generator=g)) for r in (3, 2)]
    B, A = merge_lora("lora_lego", factors, [1.0, 3.0], rank=5)
    want = (factors[0][0] @ factors[0][1] + 3 * factors[1][0] @ factors[1][1]) / 4
    torch.testing.assert_close(B @ A, want, rtol=0, atol=1e-5)
    B, A = merge_lora("lora_lego", factors, rank=2, seed=3)
    assert B.shape == (12, 2) and A.shape == (2, 9)
    again = merge_lora("lora_lego", factors, rank=2, seed=3)
    assert torch.equal(B, again[0]) and torch.equal(A, again[1])
    copies = [factors[0], (factors[0][0].clone(), factors[0][1].clone())]
    B, A = merge_lora("lora_lego", copies, rank=3)  # units of two copies pair up: the copy back
    torch.testing.assert_close(B @ A, factors[0][0] @ factors[0][1], rtol=0, atol=1e-5)


PEFT_READER = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModel
from safetensors.torch import save_file
base, adapter, out = sys.argv[1:]
model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapter).merge_and_unload()
assert "slimtune" not in sys.modules
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
"""


def test_merged_adapter_loads_in_slimtune_and_in_peft(adapters, tmp_path):
    dirs, _ = adapters
    out = merge_models(spec("knots", dirs, density=0.5), tmp_path / "a", progress=False)
    model, _ = load_model("minilm-l6")
    ours = adapt.merge(adapt.load(model, out)).state_dict()
    subprocess.run([sys.executable, "-c", PEFT_READER, str(resolve_model_dir("minilm-l6")),
                    str(out), str(tmp_path / "peft.safetensors")], check=True)
    theirs = load_file(str(tmp_path / "peft.safetensors"))
    for name in ("encoder.layer.3.attention.self.query.weight", "encoder.layer.5.output.dense.weight"):
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=1e-6)


def test_mixed_model_and_adapter_inputs_merge_densely(adapters, tmp_path):
    dirs, dense = adapters
    full = tmp_path / "full"
    model = adapted("lora", 4, seed=0)
    adapt.merge(model).save_pretrained(full)
    out = merge_models(spec("ties", [full, dirs[1]], weights=(1.0, 1.0), density=0.3),
                       tmp_path / "m", progress=False)
    merged, base = load_file(str(out / "model.safetensors")), base_state()
    mine = {k: v for k, v in model.state_dict().items()}
    for name in ("encoder.layer.1.attention.self.value.weight", "embeddings.LayerNorm.weight"):
        want = base[name] + merge_deltas("ties", [mine[name] - base[name],
                                                  dense[1][name] - base[name]], density=0.3)
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)


def test_ties_model_scope_trims_the_whole_task_vector(adapters, tmp_path):
    dirs, dense = adapters
    out = merge_models(spec("ties", dirs[:2], weights=(1.0, 1.0), density=0.1, scope="model"),
                       tmp_path / "m", progress=False)
    merged, base = load_file(str(out / "model.safetensors")), base_state()
    floats = [n for n, t in base.items() if t.is_floating_point()]
    taus = []
    for d in dirs[:2]:  # bit for bit the task vectors the merge sees
        layers = {f"{n}.weight": B @ A for n, (B, A) in read_adapter(d).layers.items()}
        taus.append({n: (base[n] + layers[n]) - base[n] if n in layers else 0 * base[n]
                     for n in floats})
    kept = []
    for tau in taus:
        flat = torch.cat([t.reshape(-1) for t in tau.values()]).abs()
        k = int(0.1 * flat.numel())
        threshold = flat.kthvalue(flat.numel() - k + 1).values
        kept.append({n: t * (t.abs() >= threshold) for n, t in tau.items()})
    assert sum(int((t != 0).sum()) for t in kept[0].values()) < 0.11 * flat.numel()
    for name in floats:
        want = base[name] + merge_deltas("ties", [kept[0][name], kept[1][name]], density=1.0)
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method, params", [("linear", {}), ("ties", {"density": 0.3}),
                                            ("tall_masks", {})])
def test_chunked_streaming_equals_whole_tensors(adapters, tmp_path, monkeypatch, method, params):
    """Row chunks of 4 KB: elementwise methods, and TIES's per-tensor trim from its stream's
    exact masks, give what the method gives on whole tensors."""
    dirs, _ = adapters
    monkeypatch.setattr(dense_merge, "CHUNK_BYTES", 4096)
    calls = []
    streamed = dense_merge.streamed_rows
    monkeypatch.setattr(dense_merge, "streamed_rows", lambda *a: calls.append(a[0]) or streamed(*a))
    out = merge_models(spec(method, dirs, output="model", **params), tmp_path / "m",
                       progress=False)
    assert bool(calls) == (method == "ties")
    merged, base = load_file(str(out / "model.safetensors")), base_state()
    taus = []
    for d in dirs:  # bit for bit the task vectors the merge sees
        layers = {f"{n}.weight": B @ A for n, (B, A) in read_adapter(d).layers.items()}
        taus.append({n: (base[n] + layers[n]) - base[n] if n in layers else 0 * base[n]
                     for n in base if base[n].is_floating_point()})
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.4.output.dense.weight",
                 "encoder.layer.4.output.dense.bias"):
        want = base[name] + merge_deltas(method, [t[name] for t in taus], [1.0, 0.5, 2.0],
                                         **params)
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)


def test_bad_adapter_inputs_are_one_error_before_anything_is_written(adapters, tmp_path):
    dirs, _ = adapters
    dora = tmp_path / "dora"
    adapt.save(adapted("dora", 2, seed=5), dora)
    foreign = tmp_path / "foreign"
    manifest = json.loads((dirs[0] / "adapter.json").read_text())
    foreign.mkdir()
    (foreign / "adapter.json").write_text(json.dumps({**manifest, "base_model": "smollm2-135m"}))
    (foreign / "adapter.safetensors").write_bytes((dirs[0] / "adapter.safetensors").read_bytes())
    cases = [
        (spec("linear", [dirs[0], dora]), r"models\[1\].*DoRA"),
        (spec("linear", [foreign]), r"models\[0\].*base model smollm2-135m, not the base named"),
        (spec("ties", dirs, density=0.5, output="adapter"),
         "output: adapter: ties does not merge in factored form"),
        (spec("ties", dirs, density=0.5, scope="layer"), "scope"),
    ]
    for i, (config, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            merge_models(config, tmp_path / f"out{i}", progress=False)
        assert not (tmp_path / f"out{i}").exists()


def test_kth_magnitude_counts_what_a_threshold_keeps():
    from slimtune.weights.magnitude_threshold import KthMagnitude, kth_magnitude

    x = torch.tensor([3.0, -3.0, 3.0, 2.0, -1.0, 0.0, 0.0, 5.0])
    for k, (value, kept) in enumerate([(float("inf"), 0), (5, 1), (3, 4), (3, 4), (3, 4), (2, 5),
                                       (1, 6), (0, 8), (0, 8)]):
        finder = KthMagnitude(8, k)
        for _ in range(2):
            finder.count(x[:3])
            finder.count(x[3:])
            if finder.pass_index == 0:
                finder.next_pass()
        assert (finder.value(), finder.kept()) == (value, kept)
    g = torch.Generator().manual_seed(0)
    pieces = [torch.randn(300, 7, generator=g), torch.randn(999, generator=g) * 4]
    flat = torch.cat([p.reshape(-1) for p in pieces]).abs()
    for k in (1, 17, 1500, flat.numel()):
        assert kth_magnitude(pieces, k) == flat.sort(descending=True).values[k - 1]
