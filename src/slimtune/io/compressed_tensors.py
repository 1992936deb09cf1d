"""Read a compressed-tensors ``pack-quantized`` checkpoint (what ``slimtune export --format
compressed-tensors`` and llm-compressor write) back into slimtune: every quantised linear becomes
a :class:`~slimtune.layers.FactoredLinear` over a :class:`~slimtune.layers.PackedQuantBase`
holding the same integers, so evaluation runs slimtune's own packed kernels and no
``compressed-tensors`` package is needed. Layout: :mod:`slimtune.export.compressed_tensors`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from slimtune.io.checkpoint import tied_parameter_names
from slimtune.layers import FactoredLinear, LowRank, PackedQuantBase
from slimtune.targets import set_module
from slimtune.weights.packing import pack, unpack_int32

ADAPTER_DIR = "adapter"  # the PEFT adapter of low-rank parts, beside the quantised weights

def is_compressed_tensors(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    q = json.loads(config.read_text()).get("quantization_config") or {}
    return q.get("quant_method") == "compressed-tensors"


def _matches(name: str, module: nn.Module, targets) -> bool:
    for t in targets:
        if t.startswith("re:") and re.match(t[3:], name):
            return True
        if t == name or t == type(module).__name__ or (t == "Linear"
                                                       and isinstance(module, nn.Linear)):
            return True
    return False


def _schemes(qconfig: dict, model: nn.Module) -> dict[str, dict]:
    """``module name -> weights quantisation args`` for every quantised linear."""
    if qconfig.get("format") != "pack-quantized" or qconfig.get(
            "quantization_status") != "compressed":
        raise ValueError(f"only compressed pack-quantized checkpoints are read, got format "
                         f"{qconfig.get('format')!r}, status {qconfig.get('quantization_status')!r}")
    ignore = qconfig.get("ignore") or []
    found = {}
    for group, g in qconfig.get("config_groups", {}).items():
        w = g.get("weights") or {}
        if g.get("input_activations") or g.get("output_activations"):
            raise ValueError(f"{group}: activation quantisation is not supported")
        if w.get("type") != "int" or w.get("strategy") not in ("group", "channel"):
            raise ValueError(f"{group}: only int weights per group or channel are read, got "
                             f"{w.get('type')!r} / {w.get('strategy')!r}")
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and _matches(name, m, g.get("targets", [])) and not (
                    _matches(name, m, ignore)):
                found[name] = w
    return found


@torch.no_grad()
def quantised_layer(state: dict, name: str, w: dict, linear: nn.Linear,
                    dtype: torch.dtype) -> FactoredLinear:
    bits, sym = int(w["num_bits"]), bool(w["symmetric"])
    group = w.get("group_size") if w.get("strategy") == "group" else None
    out, n_in = (int(v) for v in state.pop(f"{name}.weight_shape").tolist())
    offset = 2 ** (bits - 1)
    u = unpack_int32(state.pop(f"{name}.weight_packed"), bits, n_in)
    scale = state.pop(f"{name}.weight_scale").to(dtype)
    zero_words = state.pop(f"{name}.weight_zero_point", None)
    if sym:
        zero = torch.zeros_like(scale, dtype=torch.int8)
    else:
        if zero_words is None:
            raise ValueError(f"{name}: an asymmetric layer without weight_zero_point")
        zero = (unpack_int32(zero_words.T.contiguous(), bits, out).T - offset).to(torch.int8)
    base = PackedQuantBase(pack(u, bits), scale, zero.contiguous(), n_in, bits, group, sym)
    bias = state.pop(f"{name}.bias", None)
    return FactoredLinear(n_in, out, base=base, bias=None if bias is None else bias.to(dtype))


def load_compressed_tensors(path: str | os.PathLike, model_cls, dtype: torch.dtype = torch.float32):
    """The model in ``path`` with its quantised linears as packed slimtune layers."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    qconfig = config.quantization_config
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    del config.quantization_config
    model = model_cls.from_config(config, dtype=dtype)
    schemes = _schemes(qconfig, model)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    for name, w in schemes.items():
        try:
            set_module(model, name, quantised_layer(state, name, w, model.get_submodule(name),
                                                    dtype))
        except KeyError as err:
            raise ValueError(f"{path}: {name} is quantised but {err} is missing") from err
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = tied_parameter_names(model)
    missing = [k for k in missing if k not in tied and not any(
        k.startswith(f"{n}.") for n in schemes)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.tie_weights()
    if (path / ADAPTER_DIR / "adapter_config.json").is_file():
        add_lora(model, path / ADAPTER_DIR)
    return model.eval()


@torch.no_grad()
def add_lora(model: nn.Module, adapter: Path) -> None:
    """Put the PEFT LoRA adapter ``adapter`` (as the export writes it beside quantised weights) on
    the model's factored layers as frozen low-rank parts: ``(alpha / r)·B·A``."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ValueError(f"{adapter}: only plain LoRA adapters are read")
    weights = load_file(adapter / "adapter_model.safetensors")
    for name in cfg["target_modules"]:
        layer = model.get_submodule(name)
        key = f"base_model.model.{name}"
        A, B = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
        r = cfg.get("rank_pattern", {}).get(name, cfg["r"])
        alpha = cfg.get("alpha_pattern", {}).get(name, cfg["lora_alpha"])
        if not isinstance(layer, FactoredLinear) or A.shape[0] != r:
            raise ValueError(f"{adapter}: {name} does not match the model")
        layer.lowrank = LowRank(A.to(layer.base.scale.dtype), B.to(layer.base.scale.dtype),
                                scale=alpha / r, train_A=False, train_B=False)
