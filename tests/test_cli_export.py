"""`slimtune export`: validation before loading, the three formats from a saved compressed model,
and `slimtune eval` on what it wrote."""
import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from slimtune.calib import calibration_windows, run_pipeline
from slimtune.cli import app
from slimtune.compress import build_steps, load_recipe
from slimtune.io.checkpoint import save_model
from slimtune.export.gguf import estimate_bytes
from slimtune.models import load_model, model_skeleton

runner = CliRunner()


@pytest.fixture(scope="module")
def saved_rtn(smollm2, tmp_path_factory):
    """SmolLM2 with RTN 4-bit g32 (fp16 scales) on every projection, saved by slimtune."""
    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    steps = build_steps(load_recipe("- {method: rtn, bits: 4, group_size: 32, fp16_scales: true}"))
    run_pipeline(model, calibration_windows(tok, "ptb", "train", n=1, seqlen=32, seed=0), steps,
                 progress=False)
    path = tmp_path_factory.mktemp("rtn") / "model"
    save_model(model, tok, path)
    return path


@pytest.mark.parametrize("args, message", [
    (["--format", "onnx"], "unknown format 'onnx'"),
    (["--format", "gguf", "--gguf-type", "q3_k"], "unknown GGUF type 'q3_k'"),
    (["--format", "gguf", "--embedding-type", "q2"], "unknown embedding type 'q2'"),
    (["--format", "compressed-tensors", "--gguf-type", "q4_0"], "apply to --format gguf only"),
    (["--format", "compressed-tensors", "--embedding-type", "q8_0"],
     "stores the embedding in f32 or f16"),
    (["--format", "hf", "--embedding-type", "f16"], "gguf and compressed-tensors only"),
])
def test_bad_arguments_exit_2_before_loading(args, message, tmp_path):
    out = tmp_path / ("m.gguf" if "gguf" in args else "o")
    result = runner.invoke(app, ["export", "--model", "smollm2-135m", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not out.exists()


def test_gguf_needs_a_gguf_file_name_a_llama_model_and_a_free_path(tmp_path):
    result = runner.invoke(app, ["export", "-m", "smollm2-135m", "-f", "gguf", "-o",
                                 str(tmp_path / "m.bin")])
    assert result.exit_code == 2 and "*.gguf" in result.stderr
    result = runner.invoke(app, ["export", "-m", "minilm-l6", "-f", "gguf", "-o",
                                 str(tmp_path / "m.gguf")])
    assert result.exit_code == 2 and "llama architecture" in result.stderr
    (tmp_path / "x.gguf").write_bytes(b"keep")
    result = runner.invoke(app, ["export", "-m", "smollm2-135m", "-f", "gguf", "-o",
                                 str(tmp_path / "x.gguf")])
    assert result.exit_code == 2 and "already exists" in result.stderr
    result = runner.invoke(app, ["export", "-m", "smollm2-135m", "-f", "gguf", "-o",
                                 str(tmp_path / "x.gguf"), "--overwrite"])
    assert result.exit_code == 2 and "slimtune did not write it" in result.stderr
    assert (tmp_path / "x.gguf").read_bytes() == b"keep"


def test_export_all_formats_and_eval_them(saved_rtn, tmp_path):
    eval_args = ["--data", "ptb", "--max-tokens", "512", "--seqlen", "256", "--json"]
    ref = runner.invoke(app, ["eval", "-m", str(saved_rtn), *eval_args])
    assert ref.exit_code == 0, ref.output
    want = json.loads(ref.stdout.strip().splitlines()[-1])["perplexity"]
    for fmt, out in (("compressed-tensors", tmp_path / "ct"), ("gguf", tmp_path / "m.gguf"),
                     ("hf", tmp_path / "hf")):
        result = runner.invoke(app, ["export", "-m", str(saved_rtn), "-f", fmt, "-o", str(out)])
        assert result.exit_code == 0, result.output
        info = json.loads(result.stdout.strip().splitlines()[-1])
        assert info["bytes"] > 0 and out.exists()
        if fmt == "gguf":  # every layer went to Q4_0: the size estimated before the work holds
            assert info["layers"] == {"exact:q4_0": 210}
            skeleton = model_skeleton(saved_rtn)
            assert estimate_bytes(skeleton, "q4_0", "q8_0") == pytest.approx(info["bytes"],
                                                                             rel=0.01)
            assert estimate_bytes(skeleton, "auto", "q8_0") > info["bytes"]  # an upper bound
        got = runner.invoke(app, ["eval", "-m", str(out), *eval_args])
        assert got.exit_code == 0, got.output
        ppl = json.loads(got.stdout.strip().splitlines()[-1])["perplexity"]
        assert ppl == pytest.approx(want, rel=1e-5), fmt
    assert json.loads((tmp_path / "ct" / "config.json").read_text())[
        "quantization_config"]["format"] == "pack-quantized"
    model, _ = load_model(tmp_path / "ct")
    assert type(model.model.layers[3].mlp.up_proj.base).__name__ == "PackedQuantBase"


def test_fp16_scales_are_float16_values_and_survive_a_reload(saved_rtn):
    model, _ = load_model(saved_rtn)
    base = model.model.layers[0].self_attn.q_proj.base
    assert base.spec.fp16_scales and base.config()["fp16_scales"] is True
    assert torch.equal(base.scale.to(torch.float16).to(base.scale.dtype), base.scale)
