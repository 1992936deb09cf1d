"""Merging adapters without densifying them: every input is a LoRA adapter and the method has a
``merge_factors(factors, weights, config, generator) -> (B, A)`` hook.

``factors`` holds one ``(B [out, r], A [r, in])`` per model with ``ΔWᵢ = Bᵢ·Aᵢ`` on the original
weight (the adapter's scale folded into ``B``; a model that does not adapt the layer gives
``r = 0``); ``weights`` the models' weights as a 1-D tensor. The result is the merged update
``ΔW = B·A`` of the layer. The output directory holds it as a slimtune adapter and as a PEFT LoRA
adapter on the named base (:func:`~slimtune.io.adapter_files.write_lora_adapter`), so ``slimtune
eval --model OUT`` and ``peft``/``transformers`` load it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from slimtune.io.adapter_files import write_lora_adapter
from slimtune.io.safetensors_stream import DTYPES
from slimtune.merge.registry import MERGES
from slimtune.progress import progress_bar


def layer_factors(sources: list, weight: str, shape: tuple[int, int]) -> list:
    """One ``(B, A)`` per source for base weight ``weight`` (rank 0 where it is not adapted)."""
    empty = (torch.zeros(shape[0], 0), torch.zeros(0, shape[1]))
    return [source.factors(weight) or empty for source in sources]


def merge_adapters(tmp: Path, spec, config, sources: list, base: Path, shapes: dict,
                   weights: list[float], progress: bool) -> None:
    """Merge the adapters layer by layer in factored form and write the merged adapter."""
    merge_factors = MERGES.get(spec.method).hook("merge_factors")
    names = [n for n in shapes if any(s.factors(n) is not None for s in sources)]
    w = torch.tensor(weights)
    generator = torch.Generator().manual_seed(getattr(config, "seed", 0))
    merged = {}
    bar, task = progress_bar(len(names), f"merge adapters ({spec.method})", progress)
    with bar:
        for name in names:
            factors = layer_factors(sources, name, shapes[name][0])
            merged[name.removesuffix(".weight")] = merge_factors(factors, w, config, generator)
            bar.advance(task)
    base_config = json.loads((base / "config.json").read_text())
    causal = any(a.endswith("ForCausalLM") for a in base_config.get("architectures") or [])
    write_lora_adapter(tmp, merged, str(base), DTYPES[shapes[names[0]][1]], causal)
