"""merge_models on real MiniLM directories: streamed output equals merge_deltas on whole
tensors, sharding, what is copied, and every bad input as one error before anything is written."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimtune.merge import MERGES, merge_deltas
from slimtune.merge.models import merge_models
from slimtune.models import resolve_model_dir


def config(dirs, **params):
    return {"method": "ties", "base": "minilm-l6",
            "models": [{"path": str(d), "weight": w} for d, w in zip(dirs, (1.0, 0.5))],
            "density": 0.5, **params}


def test_streamed_merge_equals_merge_deltas_and_loads(minilm_experts, tmp_path):
    base, dirs, state = minilm_experts
    out = merge_models(config(dirs), tmp_path / "merged", shard_bytes=20 * 2 ** 20,
                       progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    merged = {}
    for f in files:
        merged.update(load_file(str(out / f)))
    assert set(merged) == set(state)
    tuned = [load_file(str(d / "model.safetensors")) for d in dirs]
    assert any(not t.is_floating_point() for t in state.values())  # the buffer case is tested
    for name, t in state.items():
        if not t.is_floating_point():
            assert torch.equal(merged[name], t)
            continue
        want = t + merge_deltas("ties", [m[name] - t for m in tuned], [1.0, 0.5], density=0.5)
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    manifest = json.loads((out / "slimtune_merge.json").read_text())["merge"]
    assert manifest["params"]["density"] == 0.5 and manifest["params"]["lambda"] == 1.0
    from transformers import AutoModel
    model = AutoModel.from_pretrained(out)
    assert torch.equal(model.state_dict()["embeddings.word_embeddings.weight"],
                       merged["embeddings.word_embeddings.weight"])


def test_dare_merges_are_deterministic_per_seed(minilm_experts, tmp_path):
    _, dirs, _ = minilm_experts
    runs = [merge_models(config(dirs, method="dare", seed=s), tmp_path / f"m{i}", progress=False)
            for i, s in enumerate((1, 1, 2))]
    a, b, c = (load_file(str(r / "model.safetensors")) for r in runs)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def bad_shape(root, dirs):
    d = root / "bad"
    shutil.copytree(dirs[0], d)
    state = load_file(str(d / "model.safetensors"))
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"][:-1]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def other_arch(root, dirs):
    d = root / "arch"
    shutil.copytree(dirs[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "roberta"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def slerp_of_three(c, root, dirs):
    c.pop("density")
    c.update(method="slerp", t=0.5)
    c["models"].append({"path": str(dirs[0])})


@pytest.mark.parametrize("change, message", [
    (lambda c, r, d: c.update(method="nope"), "method: unknown merge method 'nope'"),
    (lambda c, r, d: c.update(density=0), "merge config \\(ties\\): density"),
    (lambda c, r, d: c.update(denisty=0.3), "denisty: unknown parameter"),
    (lambda c, r, d: c.update(models=[]), "models"),
    (slerp_of_three, r"models \(slerp\): merges exactly 2 models, got 3"),
    (lambda c, r, d: c["models"].append({"path": str(r / "missing")}),
     r"models\[2\] .*no such directory"),
    (lambda c, r, d: c["models"].append({"path": str(bad_shape(r, d))}),
     r"models\[2\] .*word_embeddings.weight has shape \[30521, 384\]"),
    (lambda c, r, d: c["models"].append({"path": str(other_arch(r, d))}),
     r"models\[2\] .*model_type 'roberta' differs"),
])
def test_bad_config_is_one_error_before_anything_is_written(minilm_experts, tmp_path, change,
                                                           message):
    _, dirs, _ = minilm_experts
    c = config(dirs)
    change(c, tmp_path, dirs)
    with pytest.raises(ValueError, match=message):
        merge_models(c, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_merges_and_refuses_bad_configs(minilm_experts, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from slimtune.cli import app

    _, dirs, _ = minilm_experts
    text = {k: v for k, v in config(dirs, method="task_arithmetic").items() if k != "density"}
    good = tmp_path / "merge.yaml"
    good.write_text(yaml.safe_dump(text | {"lambda": 0.5}))
    result = CliRunner().invoke(app, ["merge", "--config", str(good), "--out",
                                      str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "merged 2 inputs with task_arithmetic into a model" in result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
    again = CliRunner().invoke(app, ["merge", "-c", str(good), "-o", str(tmp_path / "m")])
    assert again.exit_code == 2 and "already exists" in again.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(text | {"models": [{"path": str(tmp_path / "nope")}]}))
    result = CliRunner().invoke(app, ["merge", "-c", str(bad), "-o", str(tmp_path / "n")])
    assert result.exit_code == 2 and "no such directory" in result.stderr
    assert not (tmp_path / "n").exists()


def test_malformed_yaml_is_a_clear_error(tmp_path):
    from slimtune.merge.models import load_config

    bad = tmp_path / "merge.yaml"
    bad.write_text("method: ties\nmodels: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_a_dtype_that_is_not_merged_is_named_before_work(tmp_path):
    base = resolve_model_dir("minilm-l6")
    odd = tmp_path / "odd"
    odd.mkdir()
    shutil.copy2(base / "config.json", odd / "config.json")
    save_file({"w": torch.zeros(2, 2).to(torch.float8_e4m3fn)}, str(odd / "model.safetensors"))
    c = {"method": "linear", "base": str(odd), "models": [{"path": str(odd)}]}
    with pytest.raises(ValueError, match="base tensor w has dtype F8_E4M3"):
        merge_models(c, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", MERGES.names())
def test_every_registered_method_writes_a_model_transformers_loads(minilm_experts, tmp_path, method):
    from transformers import AutoModel

    _, dirs, state = minilm_experts
    config = MERGES.get(method).config
    c = {"method": method, "base": "minilm-l6", **config.example,
         "models": [{"path": str(d)} for d in dirs][:config.n_models or 2]}
    out = merge_models(c, tmp_path / "merged", progress=False)
    model = AutoModel.from_pretrained(out)
    name = "encoder.layer.0.attention.self.query.weight"
    assert model.state_dict()[name].dtype == state[name].dtype
    assert not torch.equal(model.state_dict()[name], state[name])  # the models' changes are in
