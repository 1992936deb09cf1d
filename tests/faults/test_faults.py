"""Fault injection: every command, run as a real process on tiny real settings, broken on purpose.

:data:`COMMANDS` is the one table: a command joins the suite by adding one row (how to run it so
that it writes ``OUT``). For every row: an output the file system refuses (under a file, on a
read-only tmpfs, on a full one) is one ``error:`` line and exit 2 before any work, with no OUT;
for every row that writes, SIGKILL and SIGINT while the new OUT is being put in place leave the
old OUT byte-identical, and the next run removes what the killed one left and writes the same
bytes as an uninterrupted run. Broken inputs (truncated weights, non-UTF-8 or empty text, a
model that computes NaN) are one error line too. ``slow`` rows run under ``make test-all``.
"""
from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from harness import (cli, error_lines, interrupt_at, killed, leftovers, mount_tmpfs, snapshot,
                     unmount)


@dataclass
class Workspace:
    root: Path
    inputs: dict = field(default_factory=dict)  # shared inputs (an adapter to export, ...)
    out_name: str = "out"                       # the command's OUT (a file for some commands)

    @property
    def out(self) -> Path:
        return self.root / self.out_name


@dataclass
class Command:
    name: str
    args: Callable[[Workspace, Path], list]     # the command line writing to the given OUT
    writes: bool = True
    overwrite: str = "--overwrite"              # how to rerun into an existing OUT
    slow: bool = False                          # its kill/interrupt cases only in make test-all
    out_name: str = "out"                       # OUT's name in the workspace (gguf: a file)
    last_write: str | None = None               # a file inside OUT written last, or None: OUT
    model_args: Callable | None = None          # (ws, out, model) -> the line with that model,
                                                # for a command that takes no -m
    takes_model: bool = True                    # False: it builds its model (pretrain)

    @property
    def final_rename(self) -> str:
        """The fault point of the last write: the final rename of OUT or of that file."""
        return f"final-rename:{self.last_write or self.out_name}"

    def with_model(self, ws: Workspace, model) -> list:
        """The command line with ``model`` as the model (replacing ``-m X``, or added)."""
        if self.model_args is not None:
            return self.model_args(ws, ws.out, model)
        args = self.args(ws, ws.out)
        if "-m" in args:
            i = args.index("-m")
            return [*args[:i + 1], model, *args[i + 2:]]
        return [*args, "-m", model]


COMMANDS = [
    Command("eval", lambda ws, out: ["eval", "-m", "smollm2-135m", "--data", "ptb",
                                     "--max-tokens", "64", "--seqlen", "32", "--json"],
            writes=False),
    Command("inspect", lambda ws, out: ["inspect", "-m", "minilm-l6", "--out", out],
            overwrite="", slow=True, last_write="layers.json"),
    Command("compress", lambda ws, out: ["compress", "-m", "minilm-l6", "--recipe",
                                         "recipes/svd.yaml", "--n", "2", "--seqlen", "16",
                                         "--out", out]),
    Command("adapt", lambda ws, out: ["adapt", "-m", "minilm-l6", "--method", "lora", "--r", "2",
                                      "--task", "finefoods", "--steps", "2", "--batch", "2",
                                      "--seqlen", "16", "--eval-examples", "8", "--out", out]),
    Command("pretrain", lambda ws, out: ["pretrain", "--hidden", "32", "--layers", "1",
                                         "--heads", "2", "--tokens", "64", "--seqlen", "16",
                                         "--batch", "2", "--eval-tokens", "32", "--out", out],
            takes_model=False),
    Command("export-peft", lambda ws, out: ["export-peft", "--adapter", ws.inputs["adapter"],
                                            "--out", out], slow=True),
    Command("export", lambda ws, out: ["export", "-m", ws.inputs["rtn"], "--format",
                                       "compressed-tensors", "--out", out]),
    Command("export-gguf", lambda ws, out: ["export", "-m", "smollm2-135m", "--format", "gguf",
                                            "--out", out.with_suffix(".gguf")],
            slow=True, out_name="out.gguf"),
    Command("merge", lambda ws, out: ["merge", "--config", merge_config(ws), "--out", out],
            model_args=lambda ws, out, model: ["merge", "--config", merge_config(ws, model),
                                               "--out", out]),
    Command("merge-adapters", lambda ws, out: ["merge", "--config", adapters_config(ws),
                                               "--out", out],
            model_args=lambda ws, out, model: ["merge", "--config",
                                               adapters_config(ws, model), "--out", out]),
    Command("compare", lambda ws, out: ["compare", "--base", "minilm-l6", "--models",
                                        ws.inputs["adapter"], "--out", out],
            model_args=lambda ws, out, model: ["compare", "--base", "minilm-l6", "--models",
                                               model, "--out", out],
            overwrite="", slow=True, last_write="alignment.png"),
]
WRITERS = [c for c in COMMANDS if c.writes]


def merge_config(ws: Workspace, model=None) -> Path:
    """A TIES merge of MiniLM with the RTN-compressed-and-merged MiniLM (a real second model of
    the same base) and ``model`` (default: MiniLM itself), written into the workspace."""
    import yaml

    from slimtune.models import resolve_model_dir

    path = ws.root / "merge.yaml"
    models = [ws.inputs["dense_rtn"], model or resolve_model_dir("minilm-l6")]
    path.write_text(yaml.safe_dump({"method": "ties", "base": "minilm-l6", "density": 0.5,
                                    "models": [{"path": str(m)} for m in models]}))
    return path


def adapters_config(ws: Workspace, model=None) -> Path:
    """A factored linear merge of the shared LoRA adapter with itself (or with ``model``): the
    output is an adapter directory."""
    import yaml

    path = ws.root / "merge-adapters.yaml"
    models = [ws.inputs["adapter"], model or ws.inputs["adapter"]]
    path.write_text(yaml.safe_dump({"method": "linear", "base": "minilm-l6",
                                    "models": [{"path": str(m)} for m in models]}))
    return path


def marks(command: Command, slow_case: bool = False):
    return pytest.param(command, id=command.name,
                        marks=[pytest.mark.slow] if slow_case and command.slow else [])


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Inputs some commands need: a small LoRA adapter on the MiniLM encoder (for export-peft),
    MiniLM compressed by RTN 4-bit (for export) and that model made dense (for merge)."""
    import torch

    from slimtune import adapt
    from slimtune.models import load_model

    adapter = tmp_path_factory.mktemp("inputs") / "adapter"
    model = adapt.apply(load_model("minilm-l6")[0], "lora", r=2, progress=False)
    with torch.no_grad():
        for p in adapt.trainable_parameters(model).values():
            p.add_(0.01)
    adapt.save(model, adapter)
    rtn = adapter.parent / "rtn"
    proc = cli(["compress", "-m", "minilm-l6", "--recipe", "recipes/rtn.yaml", "--out", rtn])
    assert proc.returncode == 0, proc.stderr
    dense_rtn = adapter.parent / "dense-rtn"
    proc = cli(["export", "-m", rtn, "--format", "hf", "--out", dense_rtn])
    assert proc.returncode == 0, proc.stderr
    return {"adapter": adapter, "rtn": rtn, "dense_rtn": dense_rtn}


@pytest.fixture
def ws(tmp_path, shared, request):
    """The test's workspace; OUT is named as the test's ``command`` parameter says."""
    command = getattr(request.node, "callspec", None) and request.node.callspec.params.get(
        "command")
    return Workspace(tmp_path, dict(shared), command.out_name if command else "out")


def assert_user_error(proc, message: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


# -- every command: a model that is not there is one error line --------------------------------
@pytest.mark.parametrize("command", [marks(c) for c in COMMANDS if c.takes_model])
def test_a_missing_model_directory_is_one_error_line(ws, command):
    proc = cli(command.with_model(ws, ws.root / "no" / "model"))
    assert_user_error(proc, "no such directory")
    assert not ws.out.exists()


# -- outputs the file system refuses: one error line, before any work ---------------------------
@pytest.mark.parametrize("command", [marks(c) for c in WRITERS])
def test_an_output_under_a_file_is_refused(ws, command):
    (ws.root / "file").write_text("x")
    out = ws.root / "file" / "out"
    assert_user_error(cli(command.args(ws, out)), "is not a directory")


@pytest.mark.parametrize("options, message", [("ro", "Read-only file system"),
                                              ("size=256k", "MB are free")])
@pytest.mark.parametrize("command", [marks(c) for c in WRITERS])
def test_a_read_only_or_full_file_system_is_refused_before_work(ws, command, options, message):
    mount = ws.root / "mnt"
    reason = mount_tmpfs(mount, options)
    if reason:
        pytest.skip(reason)
    try:
        proc = cli(command.args(ws, mount / "out"))
        assert_user_error(proc, message)
        assert not (mount / "out").exists()
    finally:
        unmount(mount)


# -- killed or interrupted while OUT is put in place --------------------------------------------
def first_output(ws: Workspace, command: Command) -> dict:
    proc = cli(command.args(ws, ws.out))
    assert proc.returncode == 0, proc.stderr
    return snapshot(ws.out)


def rerun(command: Command, ws: Workspace) -> list:
    return [*command.args(ws, ws.out), *([command.overwrite] if command.overwrite else [])]


@pytest.mark.parametrize("command", [marks(c, slow_case=True) for c in WRITERS])
def test_sigkill_during_the_final_write_keeps_the_old_output(ws, command):
    before = first_output(ws, command)
    proc = interrupt_at(rerun(command, ws), command.final_rename, signal.SIGKILL,
                        ws.root)
    assert killed(proc)
    assert snapshot(ws.out) == before  # the old OUT, intact
    target = ws.out / command.last_write if command.last_write else ws.out
    assert leftovers(target)  # the killed run's new copy, not yet in place
    again = cli(rerun(command, ws))
    assert again.returncode == 0, again.stderr
    assert "interrupted write" in again.stderr and leftovers(target) == []
    assert snapshot(ws.out) == before  # same inputs and seeds: the same bytes


@pytest.mark.parametrize("command", [marks(c, slow_case=True) for c in WRITERS])
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_moment_loses_nothing(ws, command, seed):
    """Killed at a seeded random moment of a rerun into an existing OUT: OUT is the old or the
    new output (the same bytes here), never half of one; the next run cleans up after it."""
    import random
    import subprocess
    import sys
    import time

    from harness import REPO, environment

    start = time.monotonic()
    before = first_output(ws, command)
    delay = random.Random(f"{command.name}-{seed}").uniform(0.2, time.monotonic() - start)
    proc = subprocess.Popen([sys.executable, "-m", "slimtune.cli", *map(str, rerun(command, ws))],
                            cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    assert snapshot(ws.out) == before, f"killed after {delay:.2f} s"
    again = cli(rerun(command, ws))
    assert again.returncode == 0, again.stderr
    target = ws.out / command.last_write if command.last_write else ws.out
    assert leftovers(target) == [] and snapshot(ws.out) == before


@pytest.mark.parametrize("command", [marks(c, slow_case=True) for c in WRITERS])
def test_sigint_during_the_final_write_is_one_error_line_and_leaves_nothing(ws, command):
    before = first_output(ws, command)
    proc = interrupt_at(rerun(command, ws), command.final_rename, signal.SIGINT,
                        ws.root)
    assert proc.returncode == 130, proc.stderr
    assert error_lines(proc.stderr) == ["error: interrupted (unfinished outputs were not "
                                        "written)"]
    assert snapshot(ws.out) == before and leftovers(ws.out) == []


@pytest.mark.slow
def test_adapt_killed_after_a_checkpoint_resumes_to_the_same_bytes(ws):
    adapt = next(c for c in COMMANDS if c.name == "adapt")

    def args(out):
        line = [*adapt.args(ws, out), "--save-every", "1"]
        line[line.index("--steps") + 1] = "3"
        return line

    reference = ws.root / "reference"
    proc = cli(args(reference))
    assert proc.returncode == 0, proc.stderr
    proc = interrupt_at(args(ws.out), "final-rename:step-00000002", signal.SIGKILL, ws.root)
    assert killed(proc)
    resumed = cli([*args(ws.out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 1 of 3" in resumed.stderr
    assert snapshot(ws.out) == snapshot(reference)
    history = json.loads((ws.out / "history.json").read_text())
    assert history["resumed_at"] == [1] and history["config"]["seqlen"] == 16


# -- broken inputs -----------------------------------------------------------------------------
def test_truncated_weights_are_one_error_line(ws):
    compress = next(c for c in COMMANDS if c.name == "compress")
    first_output(ws, compress)
    weights = next(ws.out.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = cli(["eval", "-m", ws.out, "--data", "ptb", "--max-tokens", "64", "--seqlen", "32"])
    assert_user_error(proc, "could not load model")
    adapter = ws.root / "adapter"
    proc = cli(["adapt", "-m", "minilm-l6", "--method", "lora", "--r", "2", "--task",
                "finefoods", "--steps", "1", "--batch", "2", "--seqlen", "16",
                "--eval-examples", "8", "--out", adapter])
    assert proc.returncode == 0, proc.stderr
    (adapter / "adapter.safetensors").write_bytes(b"\x00" * 100)
    assert_user_error(cli(["export-peft", "--adapter", adapter, "--out", ws.root / "peft"]),
                      "adapter.safetensors")
    assert not (ws.root / "peft").exists()


@pytest.mark.parametrize("content, message", [(b"caf\xe9 au lait\n" * 40, "not valid UTF-8"),
                                              (b"", "holds no text"),
                                              (b"  \n\n \n", "holds no text")])
def test_bad_text_is_one_error_line_before_loading(ws, content, message):
    text = ws.root / "bad.txt"
    text.write_bytes(content)
    assert_user_error(cli(["eval", "-m", "smollm2-135m", "--data", text]), message)
    assert_user_error(cli(["compress", "-m", "minilm-l6", "--recipe", "recipes/svd.yaml",
                           "--calib", text, "--out", ws.out]), message)
    assert not ws.out.exists()


def test_a_model_computing_nan_is_one_error_line(ws):
    """A MiniLM copy whose embedding norm has an infinite weight: its calibration activations
    are not finite from the first block on."""
    import torch

    from slimtune.models import load_model

    model, tok = load_model("minilm-l6")
    with torch.no_grad():
        model.embeddings.LayerNorm.weight[0] = float("inf")
    model.save_pretrained(ws.root / "poisoned")
    tok.save_pretrained(ws.root / "poisoned")
    proc = cli(["compress", "-m", ws.root / "poisoned", "--recipe", "recipes/svd_llm.yaml",
                "--n", "2", "--seqlen", "16", "--out", ws.out])
    assert_user_error(proc, "NaN or Inf")
    assert not ws.out.exists() and leftovers(ws.out) == []
