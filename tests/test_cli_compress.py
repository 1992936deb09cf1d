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
