"""Saving and reloading models whose linears are ``FactoredLinear`` layers.

A saved directory is an ordinary Hugging Face model directory (``config.json``, safetensors
weights, tokenizer files) plus ``slimtune.json``: ``{"format": 1, "layers": {name:
FactoredLinear.describe()}, ...metadata}``. Reloading builds the architecture from ``config.json``,
puts an empty ``FactoredLinear`` of the recorded structure at every recorded name, then loads the
weights strictly (only tied parameters may be absent from the file). With ``merge=True`` every
factored layer is turned into a plain ``nn.Linear`` first and no ``slimtune.json`` is written, so
any Hugging Face tool reads the result.

Writes are atomic: everything goes to a temporary directory beside ``out`` that is renamed into
place at the end; an interrupted save leaves no half-written ``out``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from slimtune.io.atomic import atomic_dir
from slimtune.layers import FactoredLinear
from slimtune.targets import factored_layers, merge_factored, set_module

FORMAT = 1
MANIFEST = "slimtune.json"


def save_model(model: nn.Module, tokenizer, out: str | os.PathLike, metadata: dict | None = None,
               merge: bool = False, overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``out`` atomically; see the module docstring.

    ``merge=True`` replaces the factored layers of ``model`` itself by dense linears before saving.
    An existing ``out`` raises ``FileExistsError`` unless ``overwrite``.
    """
    out = Path(out)
    with atomic_dir(out, overwrite) as tmp:
        if merge:
            merge_factored(model)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        layers = factored_layers(model)
        if layers:
            manifest = {"format": FORMAT, **(metadata or {}),
                        "layers": {name: layer.describe() for name, layer in layers.items()}}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        elif metadata:
            (tmp / "slimtune-metadata.json").write_text(json.dumps(metadata, indent=1))
    return out


def is_factored_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_factored(path: str | os.PathLike, model_cls, dtype: torch.dtype = torch.float32):
    """Rebuild a model saved by :func:`save_model` (without ``merge``) from ``path``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path / MANIFEST}: unsupported format {manifest.get('format')!r}")
    config = AutoConfig.from_pretrained(path)
    model = model_cls.from_config(config, dtype=dtype)
    for name, description in manifest["layers"].items():
        set_module(model, name, FactoredLinear.from_description(description, dtype=dtype))
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = tied_parameter_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match slimtune.json (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.tie_weights()
    return model.eval()


def tied_parameter_names(model: nn.Module) -> set[str]:
    """The output head's weight name(s) when it is tied to the input embedding (not saved)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    head = model.get_output_embeddings()
    names = {f"{n}.weight" for n, m in model.named_modules() if m is head}
    return names
