"""The three SmolLM2 experts the merge benchmark merges: Austen, PTB and fine-food reviews
(``finefoods-text``), each as LoRA r=16 and as full fine-tuning, made with ``slimtune adapt``.

One recipe for all six, the adapter quality grid's (BENCHMARKS.md, "Adapter quality"):
SmolLM2-135M, --steps (100) steps of 4 × 128 random train-split windows, AdamW with cosine decay
to 0, gradient clipping 1.0, seed 0; LoRA r=16, alpha=32 on all linear layers at lr 2e-4; full
fine-tuning at lr 2e-5 (the rates of that grid's lora and full rows). Each run checkpoints every
25 steps and is resumed (``--resume``) when this script is run again; finished experts (their
``history.json`` exists) are skipped, so the script can be rerun after an interruption.

    .venv/bin/python benchmarks/make_merge_experts.py [--out out/experts] [--steps 100]
        [--domains austen ptb finefoods-text] [--kinds lora full]

Writes OUT/<domain>-<kind>/ (an adapter directory for lora, a Hugging Face model directory for
full, and history.json with the loss curve, step times and the test perplexity).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("austen", "ptb", "finefoods-text")
LR = {"lora": "2e-4", "full": "2e-5"}


def expert_command(domain: str, kind: str, out: Path, steps: int) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "slimtune"), "adapt", "-m", "smollm2-135m",
            "--method", kind, "--r", "16", "--alpha", "32", "--targets", "all-linear",
            "--data", domain, "--steps", str(steps), "--batch", "4", "--seqlen", "128",
            "--lr", LR[kind], "--seed", "0", "--eval-tokens", "8192", "--save-every", "25",
            "--resume", "-o", str(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "experts")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    parser.add_argument("--kinds", nargs="+", default=["lora", "full"], choices=sorted(LR))
    args = parser.parse_args()
    for kind in args.kinds:
        for domain in args.domains:
            out = args.out / f"{domain}-{kind}"
            if (out / "history.json").is_file():
                print(f"{out}: done, skipped", flush=True)
                continue
            command = expert_command(domain, kind, out, args.steps)
            print("$ " + " ".join(command), flush=True)
            start = time.perf_counter()
            subprocess.run(command, check=True)
            print(f"{out}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
