"""Saving models with factored layers: exact reload, merged export, atomic writes."""
import copy
import json

import pytest
import torch

from slimtune.io.checkpoint import MANIFEST, save_model
from slimtune.layers import FactoredLinear, LowRank
from slimtune.targets import factored_layers, replace_linears
from slimtune.models import ModelNotFoundError, load_model


@pytest.fixture(scope="module")
def factored_smollm2(smollm2):
    """SmolLM2 with q_proj and down_proj replaced by pure rank-8 layers (no base)."""
    model, tok = smollm2
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)

    def rank8(name, linear):
        A = 0.05 * torch.randn(8, linear.in_features, generator=g)
        B = 0.05 * torch.randn(linear.out_features, 8, generator=g)
        return FactoredLinear(linear.in_features, linear.out_features, lowrank=LowRank(A, B))

    replace_linears(model, ["q_proj", "down_proj"], rank8)
    ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    return model, tok, ids, logits


def test_factored_model_reloads_exactly_and_is_smaller(tmp_path, factored_smollm2):
    model, tok, ids, logits = factored_smollm2
    out = save_model(model, tok, tmp_path / "ck", metadata={"recipe": "test"})
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["layers"]) == 60 and manifest["recipe"] == "test"
    reloaded, _ = load_model(out)
    assert len(factored_layers(reloaded)) == 60
    with torch.inference_mode():
        assert (reloaded(ids).logits - logits).abs().max().item() <= 1e-5
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert size < 538_000_000 * 0.8  # the dense float32 SmolLM2 is 538 MB


def test_merged_export_is_a_plain_hf_model(tmp_path, factored_smollm2):
    model, tok, ids, logits = factored_smollm2
    out = save_model(copy.deepcopy(model), tok, tmp_path / "dense", merge=True)
    assert not (out / MANIFEST).exists()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not factored_layers(plain)
    with torch.inference_mode():
        assert (plain(ids).logits - logits).abs().max().item() <= 1e-4


def test_existing_output_is_not_overwritten(tmp_path, factored_smollm2):
    model, tok, _, _ = factored_smollm2
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(model, tok, tmp_path / "ck")
    assert (tmp_path / "ck" / "keep.txt").read_text() == "precious"


def test_interrupted_save_leaves_nothing_behind(tmp_path, factored_smollm2):
    model, _, _, _ = factored_smollm2

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_model(model, BrokenTokenizer(), tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_manifest_that_does_not_match_the_weights_is_an_error(tmp_path, factored_smollm2):
    model, tok, _, _ = factored_smollm2
    out = save_model(model, tok, tmp_path / "ck")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["layers"]["model.layers.0.self_attn.q_proj"]["lowrank"]["rank"] = 4
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelNotFoundError, match="could not load"):
        load_model(out)
