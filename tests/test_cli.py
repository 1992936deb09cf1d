"""The slimtune command line: help, input validation (exit 2, one line), eval --json, inspect."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimtune.cli import app

runner = CliRunner()
SLIMTUNE = [sys.executable, "-c", "from slimtune.cli import app; app()"]


@pytest.mark.parametrize("command", [[], ["eval"], ["inspect"]])
def test_help(command):
    result = runner.invoke(app, command + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    expected = {(): "eval", ("eval",): "--max-tokens", ("inspect",): "spectra.png"}[tuple(command)]
    assert expected in result.output


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model", "--data", "ptb"], "unknown model 'no-such-model'"),
    (["--model", "smollm2-135m", "--data", "wikitext"],
     "unknown text data set 'wikitext'; valid: ptb, austen, finefoods-text or a UTF-8 text file"),
    (["--model", "smollm2-135m", "--data", "ptb", "--split", "dev"], "unknown split 'dev'"),
    (["--model", "smollm2-135m", "--data", "austen", "--split", "valid"], "unknown split 'valid'"),
    (["--model", "smollm2-135m", "--data", "missing/file.txt"], "does not exist"),
    (["--model", "smollm2-135m", "--data", "ptb", "--seqlen", "64", "--max-tokens", "10"],
     "no complete window"),
])
def test_eval_bad_input_exits_2_with_one_line(args, message):
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert result.stdout == "" and "Traceback" not in result.output


def test_inspect_unknown_model_exits_2():
    result = runner.invoke(app, ["inspect", "--model", "no-such-model"])
    assert result.exit_code == 2 and "unknown model" in result.stderr


@pytest.fixture(scope="module")
def austen_chunk(tmp_path_factory):
    from slimtune.data import load_text

    path = tmp_path_factory.mktemp("text") / "austen.txt"
    path.write_text(load_text("austen", "test")[:3000], encoding="utf-8")
    return path


def test_eval_json_on_a_text_file(austen_chunk):
    """A real process: stdout must hold exactly one JSON object, progress and logs go to stderr."""
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.run(SLIMTUNE + ["eval", "--model", "smollm2-135m", "--data", str(austen_chunk),
                                      "--split", "ignored", "--seqlen", "32", "--max-tokens", "64",
                                      "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"] == "smollm2-135m" and report["data"] == str(austen_chunk)
    assert report["split"] is None and report["seqlen"] == 32
    assert report["windows"] == 2 and report["tokens"] == 2 * 31
    assert report["parameters"] == 134_515_008
    assert 1 < report["perplexity"] < 1000
    assert report["tokens_per_s"] > 0 and report["peak_rss_mb"] > 100


def test_eval_table(austen_chunk):
    result = runner.invoke(app, ["eval", "-m", "smollm2-135m", "-d", str(austen_chunk),
                                 "--seqlen", "32", "--max-tokens", "32"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout and "1 × 32" in result.stdout


def test_eval_rejects_an_encoder(austen_chunk):
    result = runner.invoke(app, ["eval", "-m", "minilm-l6", "-d", str(austen_chunk), "--seqlen", "32"])
    assert result.exit_code == 2 and "not a causal language model" in result.stderr


def test_inspect_minilm_writes_plot_and_table(tmp_path):
    out = tmp_path / "inspect"
    result = runner.invoke(app, ["inspect", "--model", "minilm-l6", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    layers = report["layers"]
    # 6 blocks × (query, key, value, attention.output, intermediate, output) + the pooler's dense
    assert len(layers) == 37
    assert sum(row["depth"] is not None for row in layers) == 36
    assert layers[-1]["name"] == "pooler.dense"
    assert {row["type"] for row in layers if row["depth"] == 0} == {
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense"}
    row = layers[4]
    assert row["shape"] == [1536, 384] and 0 < row["energy_r8"] < row["energy_r32"] < row["energy_r128"] <= 1
    assert (out / "spectra.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "layers.json").read_text()) == layers
    assert sorted(p.name for p in out.iterdir()) == ["layers.json", "spectra.png"]


def test_inspect_table_and_default_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["inspect", "-m", "minilm-l6"])
    assert result.exit_code == 0, result.output
    assert "37 linear weights" in result.stdout and "pooler.dense" in result.stdout
    assert Path("out/inspect-minilm-l6/spectra.png").is_file()
