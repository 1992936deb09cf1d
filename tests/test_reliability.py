"""Nothing lost, every error before the work, clear errors everywhere (issue "Reliability I").

Each test here reproduces a problem found by trying the CLI as a new user would, and failed
before its fix. In-process (CliRunner) where no model needs to load; the fault-injection suite
in tests/faults/ runs real subprocesses.
"""
import errno
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from slimtune.cli import app
from slimtune.io.atomic import MARKER

runner = CliRunner()
ADAPT = ["adapt", "-m", "minilm-l6", "--method", "lora", "--task", "finefoods"]


class ReachedLoading(BaseException):
    """Raised instead of loading a model: validation passed (BaseException, so no handler in
    the CLI can turn it into an error line)."""


@pytest.fixture
def no_loading(monkeypatch):
    import slimtune.models

    def refuse(*args, **kwargs):
        raise ReachedLoading(args)

    monkeypatch.setattr(slimtune.models, "load_model", refuse)


def user_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own work")
    return out


def assert_one_error(result, message):
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output


# -- 1. nothing lost ---------------------------------------------------------------------------
def test_resume_into_a_directory_without_a_checkpoint_is_refused(tmp_path, no_loading):
    out = user_files(tmp_path)
    result = runner.invoke(app, [*ADAPT, "--out", str(out), "--resume"])
    assert_one_error(result, "holds files but no slimtune checkpoint")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("command", [
    ["compress", "-m", "minilm-l6", "--recipe", "recipes/svd.yaml"],
    ADAPT,
])
def test_overwrite_never_replaces_a_directory_slimtune_did_not_write(tmp_path, no_loading,
                                                                     command):
    out = user_files(tmp_path)
    result = runner.invoke(app, [*command, "--out", str(out), "--overwrite"])
    assert_one_error(result, "slimtune did not write it")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_of_our_own_output_passes_validation(tmp_path, no_loading):
    out = tmp_path / "ours"
    out.mkdir()
    (out / MARKER).write_text("{}")
    with pytest.raises(ReachedLoading):
        runner.invoke(app, ["compress", "-m", "minilm-l6", "--recipe", "recipes/svd.yaml",
                            "--out", str(out), "--overwrite"], catch_exceptions=False)


# -- 2. documented inputs work ----------------------------------------------------------------
@pytest.fixture(scope="module")
def book(tmp_path_factory):
    from slimtune.data import load_text

    path = tmp_path_factory.mktemp("text") / "book.txt"
    path.write_text(load_text("austen", "test")[:60000], encoding="utf-8")
    return path


def test_compress_calibrates_on_a_text_file(tmp_path, book):
    from slimtune.calib import calibration_windows
    from slimtune.models import load_model

    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", "-m", "minilm-l6", "--recipe", "recipes/svd_llm.yaml",
                                 "--calib", str(book), "--n", "4", "--seqlen", "64",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "slimtune.json").read_text())["calibration"]
    assert saved == {"data": str(book), "n": 4, "seqlen": 64, "seed": 0, "sequential": "layer",
                     "stats_precision": [None]}
    tok = load_model("minilm-l6")[1]
    assert calibration_windows(tok, str(book), "train", 4, 64, 0).shape == (4, 64)


def test_adapt_takes_a_text_file_and_lists_only_text_sources(tmp_path, book, no_loading):
    lm = ["adapt", "-m", "smollm2-135m", "--method", "lora"]
    with pytest.raises(ReachedLoading):
        runner.invoke(app, [*lm, "--data", str(book), "--out", str(tmp_path / "a")],
                      catch_exceptions=False)
    result = runner.invoke(app, [*lm, "--data", "wikitext", "--out", str(tmp_path / "b")])
    assert_one_error(result, "--data: unknown text data set 'wikitext'; valid: ptb, austen, "
                             "finefoods-text or a UTF-8 text file path")
    assert "finefoods," not in result.stderr  # the classification task is not offered
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n" * 50)
    result = runner.invoke(app, [*lm, "--data", str(tmp_path / "latin1.txt"), "--out",
                                 str(tmp_path / "c")])
    assert_one_error(result, "is not valid UTF-8")


# -- 3. errors before the work -----------------------------------------------------------------
def test_an_output_under_a_file_is_refused_before_loading(tmp_path, no_loading):
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["compress", "-m", "minilm-l6", "--recipe", "recipes/svd.yaml",
                                 "--out", str(tmp_path / "file" / "out")])
    assert_one_error(result, "is not a directory")


def test_an_unwritable_output_is_refused_before_loading(tmp_path, no_loading, monkeypatch):
    """The write probe's refusal (what a read-only file system gives; the fault suite mounts a
    real one) comes before any loading, as one line."""
    import slimtune.io.outputs as outputs

    def read_only(prefix, dir):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    result = runner.invoke(app, ["compress", "-m", "minilm-l6", "--recipe", "recipes/svd.yaml",
                                 "--out", str(tmp_path / "out")])
    assert_one_error(result, "Read-only file system")


def test_too_little_free_space_is_refused_before_loading(tmp_path, no_loading, monkeypatch):
    import shutil

    import slimtune.io.outputs as outputs

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outputs.shutil, "disk_usage",
                        lambda path: usage._replace(free=10 * 2 ** 20))
    result = runner.invoke(app, ["compress", "-m", "minilm-l6", "--recipe", "recipes/svd.yaml",
                                 "--out", str(tmp_path / "out")])
    assert_one_error(result, "MB are free")


def test_a_write_error_after_the_work_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    import slimtune.io.checkpoint as checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(checkpoint, "save_model", disk_full)
    result = runner.invoke(app, ["compress", "-m", "minilm-l6", "--recipe", "recipes/svd.yaml",
                                 "--out", str(tmp_path / "out"), "--n", "2", "--seqlen", "16"])
    assert_one_error(result, "No space left on device")
    assert not (tmp_path / "out").exists()


# -- 5. quiet traps ----------------------------------------------------------------------------
def test_a_missing_model_path_says_no_such_directory(tmp_path):
    result = runner.invoke(app, ["inspect", "--model", str(tmp_path / "nowhere")])
    assert_one_error(result, "no such directory")


def test_seed_reaches_the_adapter_and_param_seed_is_refused(tmp_path, monkeypatch):
    import slimtune.train.loop as loop

    seen = {}

    def capture(out, config, adapter, resume, overwrite=False):
        seen.update(adapter=adapter, config=config)
        raise ReachedLoading()

    monkeypatch.setattr(loop, "check_resume", capture)
    with pytest.raises(ReachedLoading):
        runner.invoke(app, [*ADAPT, "--seed", "7", "--out", str(tmp_path / "a")],
                      catch_exceptions=False)
    assert seen["adapter"].seed == 7 and seen["config"].seed == 7
    result = runner.invoke(app, [*ADAPT, "-p", "seed=3", "--out", str(tmp_path / "b")])
    assert_one_error(result, "use --seed")


def test_small_calibration_warns_naming_layers_and_the_minimum(minilm, capsys):
    import copy

    from slimtune.calib import calibration_windows, run_pipeline
    from slimtune.compress import build_steps, load_recipe

    model, tok = copy.deepcopy(minilm[0]), minilm[1]
    windows = calibration_windows(tok, "ptb", "train", n=2, seqlen=16, seed=0)  # 32 tokens
    steps = build_steps(load_recipe([{"method": "svd_llm", "ratio": 0.5,
                                      "targets": ["query"]}]))
    run_pipeline(model, windows, steps, progress=False)
    err = capsys.readouterr().err
    assert "warning: step 0" in err and "32 calibration tokens are fewer than the 384" in err
    assert "encoder.layer" in err and "at least 384 tokens (e.g. 24 windows of 16)" in err


def test_eval_takes_an_adapter_directory(smollm2, tmp_path):
    import copy

    import torch

    from slimtune import adapt
    from slimtune.evaluate import perplexity, tokenize_text
    from slimtune.data import load_text

    model = adapt.apply(copy.deepcopy(smollm2[0]), "lora", r=2, targets=["q_proj"],
                        progress=False)
    with torch.no_grad():
        for layer in adapt.trainable_parameters(model).values():
            layer.add_(0.01)  # a non-zero update, so the adapter changes the perplexity
    adapt.save(model, tmp_path / "adapter")
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "adapter"), "--data", "ptb",
                                 "--max-tokens", "128", "--seqlen", "64", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["perplexity"]
    ids = tokenize_text(smollm2[1], load_text("ptb", "test"))
    want = perplexity(model, ids, seqlen=64, max_tokens=128, progress=False)["perplexity"]
    base = perplexity(smollm2[0], ids, seqlen=64, max_tokens=128, progress=False)["perplexity"]
    assert abs(got - want) < 1e-6 * want and abs(got - base) > 1e-3


# -- 4. logs without a terminal ----------------------------------------------------------------
def test_progress_is_logged_without_a_terminal_and_goes_to_the_log_file(tmp_path):
    env = {**os.environ, "SLIMTUNE_PROGRESS_INTERVAL": "0"}
    log = tmp_path / "run.log"
    proc = subprocess.run([sys.executable, "-m", "slimtune.cli", "--log-file", str(log),
                           "inspect", "-m", "minilm-l6", "--out", str(tmp_path / "spectra")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "singular values" in proc.stderr and "ETA" in proc.stderr
    assert "singular values" in log.read_text()
    quiet = subprocess.run([sys.executable, "-m", "slimtune.cli", "--quiet", "inspect", "-m",
                            "minilm-l6", "--out", str(tmp_path / "spectra")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert quiet.returncode == 0 and "singular values" not in quiet.stderr


def test_resume_says_so_and_history_records_effective_values(minilm, tmp_path, capsys):
    import copy

    from slimtune.adapt import make_config
    from slimtune.io.atomic import NotOurDirectoryError
    from slimtune.train import ClassificationTask, make_train_config, train
    from test_train import CrashAt  # raises KeyboardInterrupt in a chosen step

    encoder, tok = minilm
    config = make_train_config(data="finefoods", steps=2, batch=2, eval_examples=8, save_every=1)
    lora = make_config("lora", r=2)
    out = tmp_path / "run"

    def task():
        return ClassificationTask(tok, "finefoods", seqlen=config.window, eval_examples=8)

    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(encoder), CrashAt(task(), 2), config, out, adapter=lora,
              progress=False)
    assert (out / MARKER).is_file()  # the run claimed OUT when it started
    _, history = train(copy.deepcopy(encoder), task(), config, out, adapter=lora, resume=True,
                       progress=False)
    assert "resumed from step 1 of 2" in capsys.readouterr().err
    assert history["config"]["seqlen"] == 128 and config.seqlen is None  # the default, recorded
    saved = json.loads((out / "history.json").read_text())
    assert saved["config"]["seqlen"] == 128 and saved["resumed_at"] == [1]
    train(copy.deepcopy(encoder), task(), config, out, adapter=lora, overwrite=True,
          progress=False)  # a finished run of ours may be redone with overwrite
    assert json.loads((out / "history.json").read_text())["resumed_at"] == []
    foreign = user_files(tmp_path)
    with pytest.raises(NotOurDirectoryError):
        train(copy.deepcopy(encoder), task(), config, foreign, adapter=lora, overwrite=True,
              progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
