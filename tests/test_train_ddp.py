"""Data-parallel training (DDP, gloo, 2 CPU processes) of a small Llama from scratch on PTB:
2 processes with batch 1 give the losses of 1 process with batch 2 (the same windows; 1e-4
relative over 5 steps) for full training with AdamW and with GaLore and for LoRA; a 2-process
run that dies after its checkpoint resumes to the uninterrupted run's losses; only rank 0
writes; a different world size cannot resume. The processes are started with
``torch.multiprocessing`` and the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ...);
``slimtune pretrain`` under the real ``torchrun`` is in tests/test_cli_pretrain.py."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from slimtune.adapt import make_config
from slimtune.train import CausalLMTask, TrainConfig, distributed, train
from slimtune.train.scratch import ArchConfig, build_model, tokenizer
from test_train import CrashAt  # raises KeyboardInterrupt in a chosen step

ARCH = ArchConfig(hidden=64, layers=2, heads=2, seed=0)
VARIANTS = {
    "adamw": ({}, None),
    "galore": ({"optimizer": "galore", "optimizer_params": {"rank": 8, "update_proj_gap": 2}},
               None),
    "lora": ({}, {"method": "lora", "r": 4}),
}


def run(out, batch: int, variant: str, crash_at: int = 0, resume: bool = False,
        steps: int = 5) -> dict | None:
    """One training run in this process (one rank of a group when ``WORLD_SIZE`` is set)."""
    fields, adapter = VARIANTS[variant]
    tok = tokenizer()
    task = CausalLMTask(tok, "ptb", seqlen=32, eval_tokens=256, seed=0, eval_batch=2)
    config = TrainConfig(data="ptb", steps=steps, batch=batch, seqlen=32, eval_tokens=256,
                         save_every=2, lr=1e-3, **fields)
    try:
        _, history = train(build_model(ARCH, tok), CrashAt(task, crash_at) if crash_at else task,
                           config, out, adapter=None if adapter is None else make_config(**adapter),
                           resume=resume, progress=False)
        return history
    except KeyboardInterrupt:
        return None


def _rank(rank: int, world: int, port: int, args: tuple, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        run(*args, **kwargs)
    finally:
        distributed.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(*args, **kwargs) -> None:
    mp.spawn(_rank, args=(2, free_port(), args, kwargs), nprocs=2, join=True)


def losses(out) -> list[float]:
    return [s["loss"] for s in json.loads((out / "history.json").read_text())["steps"]]


def rel(a, b) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_two_processes_with_batch_1_equal_one_process_with_batch_2(tmp_path, variant):
    run_two(tmp_path / "ddp", 1, variant)
    run(tmp_path / "one", 2, variant)
    history = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert history["world_size"] == 2 and history["config"]["global_batch"] == 2
    assert rel(losses(tmp_path / "ddp"), losses(tmp_path / "one")) < 1e-4
    assert history["final_eval"]["perplexity"] == pytest.approx(
        json.loads((tmp_path / "one" / "history.json").read_text())["final_eval"]["perplexity"],
        rel=1e-3)
    # rank 0 wrote the result once: nothing else in the directory
    assert not (tmp_path / "ddp" / "checkpoints").exists()


def test_a_crashed_two_process_galore_run_resumes_to_the_uninterrupted_losses(tmp_path):
    run_two(tmp_path / "straight", 1, "galore")
    run_two(tmp_path / "cut", 1, "galore", crash_at=4)  # dies in step 4, after step 2's save
    saved = json.loads((tmp_path / "cut" / "checkpoints" / "step-00000002" /
                        "run.json").read_text())
    assert saved["meta"] == {"world_size": 2}
    with pytest.raises(ValueError, match="world_size 2 -> 1"):
        run(tmp_path / "cut", 1, "galore", resume=True)
    run_two(tmp_path / "cut", 1, "galore", resume=True)
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert history["resumed_at"] == [2]
    assert rel(losses(tmp_path / "cut"), losses(tmp_path / "straight")) < 1e-5
