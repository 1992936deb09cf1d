"""`slimtune pretrain`: every bad input is one error before the model is built; a tiny Llama
trains on PTB from a config file, resumes, and under the real ``torchrun`` with 2 processes
writes one result (its losses equal the 1-process run with the same global batch)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimtune.cli import app

runner = CliRunner()
TINY = ["pretrain", "--hidden", "64", "--layers", "2", "--heads", "2", "--seqlen", "32",
        "--eval-tokens", "256"]


@pytest.fixture
def no_building(monkeypatch):
    """Fail the test if the command gets as far as building the model."""
    import slimtune.train.scratch

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were validated")

    monkeypatch.setattr(slimtune.train.scratch, "build_model", refuse)


@pytest.mark.parametrize("args, message", [
    (["--tokens", "4096", "--hidden", "100", "--heads", "6"],
     "hidden (100) must be divisible by heads (6)"),
    (["--tokens", "4096", "--hidden", "66", "--heads", "6"],
     "head width hidden/heads = 11 must be even"),
    (["--tokens", "4096", "--arch", "gpt2"], "--arch: must be 'llama'"),
    ([], "pass --tokens"),
    (["--tokens", "100"], "--tokens 100 is less than one step"),
    (["--tokens", "4096", "--global-batch", "3", "--grad-accum", "2"],
     "--global-batch 3 does not divide into 1 processes x --grad-accum 2"),
    (["--tokens", "4096", "--optimizer", "nope"], "unknown optimizer 'nope'"),
    (["--tokens", "4096", "--optimizer", "galore", "-O", "rank=65"],
     "rank 65 exceeds what model.layers.0.self_attn.q_proj [64, 64] allows"),
    (["--tokens", "4096", "--optimizer", "galore", "--method", "lora"],
     "optimizer galore: galore projects the gradients of whole linear weights"),
    (["--tokens", "4096", "--method", "lora", "--r", "65"], "--r 65 exceeds"),
    (["--tokens", "4096", "--method", "nope"], "unknown method 'nope'"),
    (["--tokens", "4096", "--data", "wikitext"], "unknown text data set 'wikitext'"),
    (["--tokens", "4096", "--method", "full", "-p", "density=0.1"], "takes no --param"),
])
def test_bad_input_is_one_error_before_the_model_is_built(no_building, tmp_path, args, message):
    result = runner.invoke(app, [*TINY, *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_world_size_that_does_not_divide_the_global_batch(no_building, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    result = runner.invoke(app, [*TINY, "--tokens", "4096", "--global-batch", "6",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "--global-batch 6 does not divide into 4 processes x --grad-accum 1" in result.output


def test_config_file_errors(no_building, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("hidden: 64\nwidth: 3\n")
    result = runner.invoke(app, [*TINY, "--tokens", "4096", "--config", str(config),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "unknown option 'width'" in result.output


def test_a_config_file_run_trains_and_resumes(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("tokens: 768\nbatch: 2\nsave-every: 2\noptimizer: galore\n"
                      "optim-param: {rank: 8, update_proj_gap: 2}\n"
                      "hook: temporary_forgetting\nhook-param: [temporary_forgetting.every=4]\n")
    out = tmp_path / "out"
    result = runner.invoke(app, [*TINY, "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    assert len(history["steps"]) == 768 // 64
    assert history["config"]["optimizer"] == "galore"
    assert history["config"]["hooks"] == [{"method": "temporary_forgetting", "seed": 0,
                                           "every": 4}]
    assert {"perplexity", "valid_perplexity"} <= set(history["final_eval"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    again = runner.invoke(app, [*TINY, "--config", str(config), "--out", str(out), "--resume"])
    assert again.exit_code == 2 and "finished run" in again.output
    changed = runner.invoke(app, [*TINY, "--config", str(config), "--hidden", "128",
                                  "--out", str(out), "--overwrite"])
    assert changed.exit_code == 0 and json.loads((out / "history.json").read_text())[
        "arch"]["hidden"] == 128


def test_torchrun_two_processes_write_one_result(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    slimtune = Path(sys.executable).with_name("slimtune")
    args = [*TINY, "--tokens", "640", "--method", "lora", "--rank", "4", "--lr", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([str(torchrun), "--nproc-per-node", "2", str(slimtune), "-q", *args,
                          "--batch", "1", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("pretrained llama") == 1  # rank 0 prints
    one = runner.invoke(app, ["-q", *args, "--batch", "2", "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    a, b = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("two", "one"))
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert [s["loss"] for s in a["steps"]] == pytest.approx([s["loss"] for s in b["steps"]],
                                                            rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())
    shutil.rmtree(tmp_path / "two")


def test_a_factored_method_trains_the_embeddings_and_norms_in_full(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["-q", *TINY, "--tokens", "128", "--batch", "2", "--method",
                                 "sltrain", "--rank", "8", "--save-every", "1", "--out",
                                 str(out)])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    vocab, hidden, layers = 49152, 64, 2
    # per block: 7 linears' factors (B, A) and 3% sparse values; 2 norms per block and a final one
    from slimtune.train.scratch import ArchConfig

    width = ArchConfig(hidden=64, layers=2, heads=2).mlp_width
    shapes = [(64, 64)] * 4 + [(width, 64)] * 2 + [(64, width)]
    factored = sum(8 * (o + i) + int(0.03 * o * i) for o, i in shapes)
    assert history["trainable_parameters"] == vocab * hidden + layers * (factored + 2 * hidden) \
        + hidden
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # merged into plain weights
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear"
