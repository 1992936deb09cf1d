"""`slimtune compress`: validation before loading, a real (small) compression, eval of the result."""
import json

import pytest
from typer.testing import CliRunner

from slimtune.cli import app

runner = CliRunner()


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("recipe, message", [
    ("- method: nope\n  ratio: 0.5\n", "nope"),
    ("- method: svd\n  ratio: 1.5\n", "ratio"),
    ("- method: svd\n  ratio: 0.5\n  rank: 3\n", "rank"),
])
def test_bad_recipe_exits_2_before_loading(tmp_path, recipe, message):
    result = runner.invoke(app, ["compress", "--model", "smollm2-135m", "--recipe",
                                 str(write(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "o").exists()


def test_existing_out_and_missing_recipe_exit_2(tmp_path):
    recipe = write(tmp_path / "r.yaml", "- method: svd\n  ratio: 0.5\n")
    (tmp_path / "o").mkdir()
    result = runner.invoke(app, ["compress", "-m", "smollm2-135m", "-r", str(recipe), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "already exists" in result.stderr
    result = runner.invoke(app, ["compress", "-m", "smollm2-135m", "-r", str(tmp_path / "x.yaml"),
                                 "-o", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


@pytest.mark.parametrize("flag, value", [("--sequential", "row"),
                                         ("--stats-precision", "fp16")])
def test_bad_order_or_precision_exits_2_before_loading(tmp_path, flag, value):
    recipe = write(tmp_path / "r.yaml", "- method: sparsegpt\n  sparsity: 0.5\n")
    result = runner.invoke(app, ["compress", "-m", "smollm2-135m", "-r", str(recipe),
                                 "-o", str(tmp_path / "o"), flag, value])
    assert result.exit_code == 2 and f"{flag} must be" in result.stderr
    assert not (tmp_path / "o").exists()


def test_target_matching_nothing_exits_2(tmp_path):
    recipe = write(tmp_path / "r.yaml", "- method: svd\n  ratio: 0.5\n  targets: [no_such_proj]\n")
    result = runner.invoke(app, ["compress", "-m", "smollm2-135m", "-r", str(recipe), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no_such_proj" in result.stderr
    assert not (tmp_path / "o").exists()


def test_compress_then_eval_the_result(tmp_path):
    recipe = write(tmp_path / "r.yaml",
                   "- method: svd_llm\n  ratio: 0.8\n  targets: 'model\\.layers\\.(0|1)\\.mlp\\..*'\n")
    out = tmp_path / "small"
    result = runner.invoke(app, ["compress", "-m", "smollm2-135m", "-r", str(recipe), "-o", str(out),
                                 "--n", "4", "--seqlen", "64"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "slimtune.json").read_text())
    assert len(manifest["layers"]) == 6 and manifest["calibration"]["n"] == 4
    result = runner.invoke(app, ["eval", "-m", str(out), "-d", "ptb", "--max-tokens", "512",
                                 "--seqlen", "256", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 10 < report["perplexity"] < 1000 and report["parameters"] < 134_515_008


def _no_loading(*args, **kwargs):
    raise AssertionError("the model's weights were loaded before the recipe was checked")


@pytest.mark.parametrize("recipe, message", [
    ("- {method: rtn, bits: 4, group_size: 128}", "group_size 128 does not divide the 576 inputs"),
    ("- {method: wanda, pattern: '3:7'}", "M=7 does not divide the input width 576"),
    ("- {method: rtn, bits: 4, targets: [q_proj]}\n- {method: eora, rank: 8}",
     "targets: 180 layers that no earlier step compresses"),
])
def test_layer_shape_problems_exit_2_before_the_weights_load(tmp_path, monkeypatch, recipe,
                                                              message):
    monkeypatch.setattr("slimtune.cli.compress.load_or_fail", _no_loading)
    result = runner.invoke(app, ["compress", "-m", "smollm2-135m", "-r",
                                 str(write(tmp_path / "r.yaml", recipe)), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "model.layers.0." in result.stderr and not (tmp_path / "o").exists()


def test_a_cholesky_failing_at_the_largest_damping_is_one_error_and_no_output(tmp_path,
                                                                              monkeypatch):
    import torch

    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A, **kw: (
        real(A, **kw)[0], torch.ones((), dtype=torch.int32)))  # "not positive definite"
    recipe = write(tmp_path / "r.yaml", "- {method: gptq, bits: 4, targets: "
                                        "[model.layers.0.self_attn.k_proj]}\n")
    result = runner.invoke(app, ["compress", "-m", "smollm2-135m", "-r", str(recipe), "-o",
                                 str(tmp_path / "o"), "--n", "2", "--seqlen", "16"])
    assert result.exit_code == 2, result.output
    assert "step 0 (QuantStep) on model.layers.0.self_attn.k_proj: Cholesky of the Hessian " \
           "failed even with damping" in result.stderr
    assert result.stderr.count("error: ") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


def test_compress_reports_bits_per_weight_and_megabytes(tmp_path):
    recipe = write(tmp_path / "r.yaml", "- {method: rtn, bits: 4, group_size: 64, targets: "
                                        "'model\\.layers\\.0\\..*'}\n")
    out = tmp_path / "q"
    result = runner.invoke(app, ["compress", "-m", "smollm2-135m", "-r", str(recipe), "-o",
                                 str(out), "--n", "1", "--seqlen", "16"])
    assert result.exit_code == 0, result.output
    assert "7 compressed layers: 4.625 bits per weight" in result.stdout
    manifest = json.loads((out / "slimtune.json").read_text())
    assert manifest["storage"]["bits_per_weight"] == pytest.approx(4.625)
