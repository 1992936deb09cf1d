"""`slimtune adapt`: validation before loading, a real (tiny) LoRA run the adapter API reloads."""
import copy
import json

import pytest
from typer.testing import CliRunner

from slimtune import adapt
from slimtune.cli import app
from slimtune.cli.adapt import parse_targets
from slimtune.evaluate import perplexity
from slimtune.train.tasks import split_ids

runner = CliRunner()
LM = ["adapt", "-m", "smollm2-135m", "--method", "lora", "--data", "austen"]
FULL = ["adapt", "-m", "smollm2-135m", "--method", "full", "--data", "austen"]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    import slimtune.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were validated")

    monkeypatch.setattr(slimtune.models, "load_model", refuse)


def test_help_lists_the_options():
    result = runner.invoke(app, ["adapt", "--help"])
    assert result.exit_code == 0
    for option in ("--method", "--grad-accum", "--save-every", "--resume", "--param",
                   "--optimizer", "--optim-param", "--hook", "--hook-param"):
        assert option in result.output


@pytest.mark.parametrize("args, message", [
    (["adapt", "-m", "nope", "--method", "lora", "--data", "austen"], "unknown model 'nope'"),
    (["adapt", "-m", "smollm2-135m", "--method", "nope", "--data", "austen"],
     "unknown method 'nope'"),
    (["adapt", "-m", "smollm2-135m", "--method", "lora", "--data", "wikitext"],
     "unknown text data set 'wikitext'; valid: ptb, austen, finefoods-text or a UTF-8 text file"),
    (["adapt", "-m", "smollm2-135m", "--method", "lora"], "pass --data"),
    (["adapt", "-m", "smollm2-135m", "--method", "lora", "--task", "finefoods"],
     "finefoods needs an encoder"),
    (["adapt", "-m", "minilm-l6", "--method", "lora", "--data", "ptb"],
     "needs a causal language model"),
    (["adapt", "-m", "minilm-l6", "--method", "lora", "--task", "imdb"], "unknown task 'imdb'"),
    ([*LM, "--task", "finefoods"], "exclude each other"),
    ([*LM, "--steps", "0"], "--steps"),
    ([*LM, "--batch", "0"], "--batch"),
    ([*LM, "--lr", "0"], "--lr"),
    ([*LM, "--seqlen", "1"], "--seqlen"),
    ([*LM, "--steps", "5", "--warmup", "9"], "warmup (9) exceeds steps (5)"),
    ([*LM, "--r", "0"], "adapter (lora): r"),
    ([*LM, "--param", "dropout=0.1"], "adapter (lora): dropout"),
    ([*LM, "--param", "rslora"], "key=value"),
    ([*LM, "--param", "r=4"], "use --r"),
    (["adapt", "-m", "smollm2-135m", "--method", "full", "--data", "ptb", "-p", "x=1"],
     "takes no --param"),
    ([*LM, "--calib-data", "ptb"], "--calib-data: calib_data='ptb': lora uses no calibration"),
    ([*LM, "--optimizer", "adam"], "--optimizer: unknown optimizer 'adam'; known: adamw"),
    ([*LM, "--optimizer", "galore", "-O", "rnak=4"],
     "optimizer (galore): rnak: unknown parameter; known:"),
    ([*LM, "--optimizer", "lion", "-O", "eps=1e-3"], "optimizer (lion): eps: unknown parameter"),
    ([*LM, "-O", "lr=1"], "--optim-param lr=...: use --lr instead"),
    (["adapt", "-m", "smollm2-135m", "--method", "full", "--data", "austen", "--optimizer",
      "galore", "-O", "rank=600"], "--optimizer: galore: rank 600 exceeds what "
     "model.layers.0.self_attn.q_proj [576, 576] allows (576)"),
    (["adapt", "-m", "smollm2-135m", "--method", "corda", "--data", "austen", "--calib-data",
      "wiki"], "--calib-data: unknown text data set 'wiki'"),
    # training hooks: --hook NAME, --hook-param NAME.key=value
    ([*FULL, "--hook", "nope"], "training (full): --hook: unknown training hook 'nope'; known:"),
    ([*FULL, "--hook", "trp", "-H", "trp.every=0"],
     "training (full): --hook: hook (trp): every: input should be greater than or equal to 1"),
    ([*FULL, "--hook", "trp", "-H", "trp.evry=2"], "hook (trp): evry: unknown parameter; known:"),
    ([*FULL, "-H", "trp.every=2"], "--hook-param trp.every=2: pass --hook trp to use that hook"),
    ([*FULL, "--hook", "trp", "-H", "every=2"], "--hook-param expects NAME.key=value, got "
     "'every=2'"),
    ([*FULL, "--hook", "trp", "-H", "trp.every"], "--hook-param expects NAME.key=value"),
    ([*FULL, "--hook", "trp", "-H", "trp.every=2", "-H", "trp.every=3"],
     "--hook-param trp.every: given twice"),
    ([*FULL, "--hook", "trp", "-H", "trp.method=x"], "--hook-param trp.method: name hooks with "
     "--hook"),
    ([*FULL, "--hook", "trp", "--hook", "trp"], "--hook trp is given twice"),
    # schedules that do not fit the run's length (issue #16)
    (["adapt", "-m", "smollm2-135m", "--method", "adalora", "--data", "austen", "--steps", "20",
      "-p", "tinit=10", "-p", "tfinal=10"],
     "tinit=10 + tfinal=10 must be below total_step=20"),
    (["adapt", "-m", "smollm2-135m", "--method", "adalora", "--data", "austen", "--r", "4",
      "-p", "target_r=8"], "target_r=8 exceeds r=4"),
    (["adapt", "-m", "smollm2-135m", "--method", "increlora", "--data", "austen", "--steps",
      "50"], "increlora: the rank never grows in 50 steps: the first growth is at step 200"),
    # layers the adapter does not fit, checked on the weightless model (issue #16)
    (["adapt", "-m", "smollm2-135m", "--method", "miss", "--data", "austen", "-p", "mini_r=100"],
     "miss: mini_r=100 does not divide the output size 576 of model.layers.0.self_attn.q_proj"),
    ([*LM, "--r", "200"], "lora: r=200 exceeds min(out, in) = 192 of "
     "model.layers.0.self_attn.k_proj"),
    (["adapt", "-m", "minilm-l6", "--method", "lora", "--task", "finefoods", "--r", "400"],
     "lora: r=400 exceeds min(out, in) = 384 of encoder."),
    (["adapt", "-m", "smollm2-135m", "--method", "sft", "--data", "austen", "-p",
      "density=1e-9"], "sft: density"),
    ([*LM, "--hook", "weight_compander"], "hook weight_compander: weight_compander "
     "reparameterises whole linear weights, which adapter method 'lora' freezes: use "
     "weight_compander with full training (--method full)"),
])
def test_bad_input_exits_2_with_one_line_before_loading(no_loading, tmp_path, args, message):
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_existing_or_finished_out_exits_2_before_loading(no_loading, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter.json").write_text("{}")
    result = runner.invoke(app, [*LM, "--out", str(out)])
    assert result.exit_code == 2 and "already exists (pass --resume" in result.stderr
    (out / "history.json").write_text(json.dumps({"finished": True}))
    result = runner.invoke(app, [*LM, "--out", str(out), "--resume"])
    assert result.exit_code == 2 and "finished run" in result.stderr


def test_resume_with_other_settings_exits_2_before_loading(no_loading, tmp_path):
    from slimtune.train import make_train_config

    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"")
    saved = make_train_config(data="austen", steps=4, lr=1e-3).model_dump(mode="json")
    (ckpt / "run.json").write_text(json.dumps({"step": 2, "config": saved, "adapter": None}))
    result = runner.invoke(app, [*LM, "--steps", "4", "--lr", "2e-3", "--resume", "--out",
                                 str(tmp_path / "run")])
    assert result.exit_code == 2 and "different settings: lr" in result.stderr, result.output


def test_targets_option_reads_names_lists_and_regexes():
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert parse_targets("q_proj") == ["q_proj"]
    assert parse_targets(r"model\.layers\.0\..*") == r"model\.layers\.0\..*"


def test_cli_lora_run_writes_an_adapter_that_load_reproduces(smollm2, tmp_path):
    out = tmp_path / "lora"
    result = runner.invoke(app, [*LM, "--targets", "q_proj,v_proj", "--r", "4", "--steps", "2",
                                 "--batch", "1", "--seqlen", "32", "--eval-tokens", "64",
                                 "--lr", "1e-3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "trained smollm2-135m with lora (r=4)" in result.stdout
    history = json.loads((out / "history.json").read_text())
    assert [r["step"] for r in history["steps"]] == [1, 2] and history["finished"]
    assert history["adapter"]["targets"] == ["q_proj", "v_proj"]

    base, tok = smollm2
    model = adapt.load(copy.deepcopy(base), out)
    assert len(model.slimtune_adapter["layers"]) == 60
    assert any(n.endswith("lowrank.B") and p.abs().max() > 0
               for n, p in model.named_parameters())  # trained, not the zero init
    ids = split_ids(tok, "austen", "test")[:64]
    ppl = perplexity(model, ids, seqlen=32, batch_size=1, progress=False)["perplexity"]
    assert ppl == pytest.approx(history["final_eval"]["perplexity"], rel=1e-5)
    reference = perplexity(base, ids, seqlen=32, batch_size=1, progress=False)["perplexity"]
    assert ppl != pytest.approx(reference, rel=1e-6)


@pytest.mark.slow
def test_cli_full_finetuning_writes_a_model_eval_reads(tmp_path):
    out = tmp_path / "full"
    result = runner.invoke(app, ["adapt", "-m", "smollm2-135m", "--method", "full", "--data",
                                 "ptb", "--steps", "2", "--batch", "1", "--seqlen", "32",
                                 "--eval-tokens", "64", "--lr", "1e-5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "history.json").read_text())
    assert history["mode"] == "full" and history["trainable_parameters"] == history["parameters"]
    result = runner.invoke(app, ["eval", "-m", str(out), "-d", "ptb", "--max-tokens", "64",
                                 "--seqlen", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["perplexity"] == pytest.approx(
        history["final_eval"]["perplexity"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["eva", "corda"])
def test_cli_data_driven_method_trains(tmp_path, method):
    args = ["adapt", "-m", "smollm2-135m", "--method", method, "--data", "austen", "--r", "4",
            "--targets", "q_proj,v_proj", "--steps", "3", "--batch", "1", "--seqlen", "32",
            "--eval-tokens", "64", "--calib-n", "4", "--save-every", "2", "--out",
            str(tmp_path / method)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = adapt.read_manifest(tmp_path / method)
    assert manifest["config"]["method"] == method
