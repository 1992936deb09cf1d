"""Reading adapter directories as low-rank weight updates, and writing merged ones.

Two formats are read, both as ``{layer name: (B, A)}`` with ``ΔW = B·A`` on the *original*
weight (the adapter's scale folded into ``B``) plus any tensor the adapter trained in full:

- a slimtune adapter (``adapter.json`` + ``adapter.safetensors``, :func:`slimtune.adapt.save`):
  each layer's ``s·B·K·A`` (core ``K`` folded into ``A``); a base-changing init (an ``origin``:
  PiSSA, MiLoRA, OLoRA, CorDA, ...) adds ``−s₀·B₀·K₀·A₀``, so the update is on the original weight
  at rank ``r + r₀``. Layers with a weight transform (DoRA), a sparse part, a mask or a non-dense
  base are not low-rank updates of the original weight: a clear error names the layer.
- a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``): ``lora_B`` and
  ``lora_A`` with PEFT's scaling ``alpha / r`` (``alpha / √r`` with ``use_rslora``),
  ``rank_pattern`` and ``alpha_pattern`` matched on the module name as PEFT matches them; DoRA
  adapters are refused, ``modules_to_save`` tensors are read as full tensors.

:func:`adapter_layout` reads only the JSON and the safetensors header (names and shapes), for
validation before any tensor is read. :func:`write_lora_adapter` writes merged updates in both
formats into one directory, so ``slimtune.adapt.load`` and ``peft``/``transformers`` each read it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SLIMTUNE_FILES = ("adapter.json", "adapter.safetensors")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
PEFT_PREFIX = "base_model.model."


def adapter_format(path: Path) -> str | None:
    """``"slimtune"``, ``"peft"`` or None (not an adapter directory)."""
    for kind, files in (("slimtune", SLIMTUNE_FILES), ("peft", PEFT_FILES)):
        if (path / files[0]).is_file():
            return kind
    return None


@dataclass
class AdapterLayout:
    """What an adapter changes, from its JSON and safetensors header only."""

    format: str
    base_model: str | None
    layers: dict[str, tuple[int, int]]            # name -> (out, in) of the updated weight
    full: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensor -> shape


@dataclass
class AdapterUpdates:
    layout: AdapterLayout
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (B [out, r], A [r, in])
    full: dict[str, torch.Tensor]                          # tensor name -> tuned value


def _header(file: Path) -> dict[str, tuple[int, ...]]:
    if not file.is_file():
        raise ValueError(f"{file.parent}: {file.name} is missing")
    try:
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors' own error type
        raise ValueError(f"{file} is not a readable safetensors file ({err})") from None


def _slimtune_layout(path: Path) -> AdapterLayout:
    manifest = json.loads((path / SLIMTUNE_FILES[0]).read_text())
    if manifest.get("format") != 1:
        raise ValueError(f"{path}/adapter.json: unsupported format {manifest.get('format')!r}")
    shapes = _header(path / SLIMTUNE_FILES[1])
    layers = {}
    for name, d in manifest["layers"].items():
        problem = ("a weight transform (DoRA)" if d.get("transform") else
                   "a sparse part" if d.get("sparse_nnz") is not None else
                   "a mask" if d.get("mask") else
                   f"a {d.get('base')} base" if d.get("base") != "dense" else
                   "no low-rank part" if d.get("lowrank") is None else None)
        if problem:
            raise ValueError(f"{path}: layer {name} has {problem}: it is not a low-rank update "
                             "of the original weight, so it cannot be merged")
        layers[name] = (d["out_features"], d["in_features"])
    owned = tuple(f"{n}." for n in layers)
    full = {k: s for k, s in shapes.items() if not k.startswith(owned)}
    return AdapterLayout("slimtune", manifest.get("base_model"), layers, full)


def _peft_layout(path: Path) -> AdapterLayout:
    config = json.loads((path / PEFT_FILES[0]).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: a {config.get('peft_type')} PEFT adapter; only LoRA is merged")
    if config.get("use_dora"):
        raise ValueError(f"{path}: a DoRA adapter: not a low-rank update of the original weight, "
                         "so it cannot be merged")
    shapes = _header(path / PEFT_FILES[1])
    layers, full = {}, {}
    for key, shape in shapes.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(".lora_A.weight"):
            B = shapes.get(key.replace(".lora_A.", ".lora_B."))
            if B is None:
                raise ValueError(f"{path}: {key} has no lora_B")
            layers[name.removesuffix(".lora_A.weight")] = (B[0], shape[1])
        elif ".modules_to_save." in name:
            full[name.replace(".modules_to_save.default", "")] = shape
        elif not name.endswith(".lora_B.weight"):
            raise ValueError(f"{path}: tensor {key} is not a LoRA factor")
    return AdapterLayout("peft", config.get("base_model_name_or_path"), layers, full)


def adapter_layout(path: Path) -> AdapterLayout:
    """The adapter at ``path`` (either format), from its JSON and safetensors header."""
    kind = adapter_format(path)
    if kind is None:
        raise ValueError(f"{path} is not an adapter directory (no {SLIMTUNE_FILES[0]} or "
                         f"{PEFT_FILES[0]})")
    try:
        return _slimtune_layout(path) if kind == "slimtune" else _peft_layout(path)
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: malformed adapter config ({err!r})") from None


def _fold(state: dict, prefix: str, desc: dict, sign: float = 1.0):
    A, B = state[f"{prefix}.A"].float(), state[f"{prefix}.B"].float()
    core = state.get(f"{prefix}.core")
    if core is not None:
        A = core.float()[:, None] * A if core.dim() == 1 else core.float() @ A
    return sign * desc["scale"] * B, A


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: a pattern applies when the name ends with it after a dot (or equals it)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def read_adapter(path: Path) -> AdapterUpdates:
    """Every update of the adapter at ``path`` in float32 (see the module docstring)."""
    layout = adapter_layout(path)
    if layout.format == "slimtune":
        state = load_file(path / SLIMTUNE_FILES[1])
        manifest = json.loads((path / SLIMTUNE_FILES[0]).read_text())
        layers = {}
        for name in layout.layers:
            d = manifest["layers"][name]
            B, A = _fold(state, f"{name}.lowrank", d["lowrank"])
            if d.get("origin"):
                B0, A0 = _fold(state, f"{name}.origin", d["origin"], -1.0)
                B, A = torch.cat([B, B0], dim=1), torch.cat([A, A0])
            layers[name] = (B, A)
        return AdapterUpdates(layout, layers, {k: state[k].float() for k in layout.full})
    config = json.loads((path / PEFT_FILES[0]).read_text())
    state = load_file(path / PEFT_FILES[1])
    layers = {}
    for name in layout.layers:
        A = state[f"{PEFT_PREFIX}{name}.lora_A.weight"].float()
        B = state[f"{PEFT_PREFIX}{name}.lora_B.weight"].float()
        r = A.shape[0]  # what rank_pattern says, as the tensors hold it
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        layers[name] = (alpha / (math.sqrt(r) if config.get("use_rslora") else r) * B, A)
    full = {}
    for key, value in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".modules_to_save." in name:
            full[name.replace(".modules_to_save.default", "")] = value.float()
    return AdapterUpdates(layout, layers, full)


def write_lora_adapter(out: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       base_model: str, dtype: torch.dtype, causal_lm: bool,
                       extra: dict | None = None) -> None:
    """Write ``{name: (B, A)}`` (``ΔW = B·A``, scale 1) into directory ``out`` as a slimtune
    adapter and as a PEFT LoRA adapter (ranks may differ per layer: ``rank_pattern``)."""
    layers = {n: (B.to(dtype).contiguous(), A.to(dtype).contiguous())
              for n, (B, A) in layers.items() if B.shape[1] > 0}
    if not layers:
        raise ValueError("the merged adapter is empty (every update has rank 0)")
    ranks = {n: B.shape[1] for n, (B, _) in layers.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    manifest = {"format": 1,
                "config": {"method": "lora", "r": r, "alpha": float(r), "targets": sorted(layers),
                           "rslora": False, "seed": 0},
                "base_model": base_model, "dtype": str(dtype).removeprefix("torch."),
                "layers": {n: {"in_features": A.shape[1], "out_features": B.shape[0],
                               "base": "dense", "mask": False, "bias": False, "merged": False,
                               "lowrank": {"rank": B.shape[1], "core": "none", "scale": 1.0},
                               "sparse_nnz": None, "transform": None, "origin": None}
                           for n, (B, A) in layers.items()},
                "trainable": sorted(f"{n}.lowrank.{p}" for n in layers for p in "AB"),
                **(extra or {})}
    save_file({f"{n}.lowrank.{p}": t for n, (B, A) in layers.items()
               for p, t in (("A", A), ("B", B))}, str(out / SLIMTUNE_FILES[1]))
    (out / SLIMTUNE_FILES[0]).write_text(json.dumps(manifest, indent=1))
    peft = {"peft_type": "LORA", "task_type": "CAUSAL_LM" if causal_lm else None,
            "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
            "r": r, "lora_alpha": float(r), "target_modules": sorted(layers),
            "rank_pattern": {n: k for n, k in ranks.items() if k != r},
            "alpha_pattern": {n: float(k) for n, k in ranks.items() if k != r},
            "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None}
    save_file({f"{PEFT_PREFIX}{n}.lora_{p}.weight": t for n, (B, A) in layers.items()
               for p, t in (("A", A), ("B", B))}, str(out / PEFT_FILES[1]))
    (out / PEFT_FILES[0]).write_text(json.dumps(peft, indent=2))
