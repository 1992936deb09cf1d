"""Export a compressed model as a compressed-tensors ``pack-quantized`` checkpoint: the format
llm-compressor writes and transformers and vLLM load (layout: ../shared/FORMATS.md; written by
slimtune itself, the ``compressed-tensors`` package is only the tests' reader).

For every layer with a quantised base (:mod:`slimtune.export.deploy_layers`)::

    <m>.weight_packed      int32 [out, ceil(in·b/32)]  each row the LSB-first bit stream of
                                                       u = q + 2^(b-1), in 32-bit words
    <m>.weight_scale       model dtype [out, groups]   (groups = 1 per channel)
    <m>.weight_shape       int64 [2] = (out, in)
    <m>.weight_zero_point  int32 [ceil(out·b/32), groups], zero + 2^(b-1) packed along dim 0
                           (asymmetric grids only)

A row of slimtune's own packed base is already that bit stream in bytes, so a row is padded to a
whole number of words and reinterpreted. Every other linear is a dense ``weight`` (a pruned one
with zeros where it was pruned: compressed-tensors removed its sparse formats in 0.15) and is
listed in ``ignore``; so is ``lm_head`` when it is tied to the embedding. One quantisation scheme
gives one config group targeting ``Linear`` (what llm-compressor writes); several schemes give
one group per scheme listing its layers by name.

``embedding_type="f16"`` stores the token embedding (and an untied output head) in float16, half
of its float32 bytes (SmolLM2-135M: 113 -> 57 MB); the format has no quantised embedding that
transformers' loader reads in every mode, so there is no 8- or 4-bit choice here.

Low-rank parts beside quantised bases go to a PEFT LoRA adapter in ``OUT/adapter/``:
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT), OUT/adapter)``.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from slimtune.export.deploy_layers import DeployLayer, QuantWeight, deploy_layers
from slimtune.export.peft import PEFT_CONFIG, PEFT_WEIGHTS, peft_config, peft_state
from slimtune.io.atomic import atomic_dir
from slimtune.io.checkpoint import tied_parameter_names
from slimtune.io.compressed_tensors import ADAPTER_DIR
from slimtune.weights.packing import pack_int32

FORMAT_NAME = "compressed-tensors pack-quantized"


def scheme_key(spec) -> tuple:
    return spec.bits, spec.sym, spec.group_size


def scheme(spec) -> dict:
    """The ``weights`` quantisation args of one config group."""
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.sym,
            "strategy": "channel" if spec.group_size is None else "group",
            "group_size": spec.group_size, "dynamic": False, "observer": "minmax",
            "actorder": None, "block_structure": None}


def quant_tensors(name: str, w: QuantWeight, dtype: torch.dtype) -> dict[str, Tensor]:
    b, offset = w.spec.bits, 2 ** (w.spec.bits - 1)
    out = {f"{name}.weight_packed": pack_int32(w.q + offset, b),
           f"{name}.weight_scale": w.scale.to(dtype),
           f"{name}.weight_shape": torch.tensor(list(w.q.shape), dtype=torch.int64)}
    if not w.spec.sym:
        out[f"{name}.weight_zero_point"] = pack_int32((w.zero + offset).T.contiguous(), b).T
    return out


def quantization_config(layers: dict[str, DeployLayer], dense: list[str]) -> dict:
    groups: dict[tuple, list[str]] = {}
    specs = {}
    for name, d in layers.items():
        if d.quant is not None:
            key = scheme_key(d.quant.spec)
            groups.setdefault(key, []).append(name)
            specs[key] = d.quant.spec
    if not groups:
        raise ValueError(f"{FORMAT_NAME}: the model has no quantised layer (export it as hf)")
    one = len(groups) == 1
    config_groups = {f"group_{i}": {"targets": ["Linear"] if one else sorted(names),
                                    "format": "pack-quantized", "weights": scheme(specs[key]),
                                    "input_activations": None, "output_activations": None}
                     for i, (key, names) in enumerate(sorted(groups.items()))}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": sorted(dense), "kv_cache_scheme": None, "sparsity_config": {},
            "transform_config": {}, "global_compression_ratio": None}


def _plain_state(model: nn.Module, factored: set[str], tied: set[str]) -> dict[str, Tensor]:
    prefixes = tuple(f"{n}." for n in factored)
    return {k: v.detach() for k, v in model.state_dict().items()
            if not k.startswith(prefixes) and k not in tied}


EMBEDDING_DTYPES = {"f32": torch.float32, "f16": torch.float16}


def embedding_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the token embedding and of an output head that is not tied to it."""
    names = {id(m): n for n, m in model.named_modules()}
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    return sorted({f"{names[id(m)]}.weight" for m in modules if m is not None})


@torch.no_grad()
def write_compressed_tensors(model: nn.Module, tokenizer, out: str | os.PathLike,
                             overwrite: bool = False, embedding_type: str = "f32") -> dict:
    """Write ``model`` to the directory ``out`` (atomically); returns what was written.

    ``embedding_type``: ``"f16"`` stores the token embedding (and an untied output head) in
    float16 (transformers casts it to the model's dtype when loading), ``"f32"`` as it is."""
    if embedding_type not in EMBEDDING_DTYPES:
        raise ValueError(f"{FORMAT_NAME}: unknown embedding type {embedding_type!r}; choose one "
                         f"of {', '.join(EMBEDDING_DTYPES)}")
    from safetensors.torch import save_file

    out = Path(out)
    layers = deploy_layers(model, FORMAT_NAME)
    tied = tied_parameter_names(model)  # not saved; lm_head (an nn.Linear) is in ignore
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    dense = [n for n, d in layers.items() if d.quant is None] + linears
    qconfig = quantization_config(layers, sorted(set(dense)))
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    state = _plain_state(model, set(layers), tied)
    if embedding_type != "f32":
        for key in embedding_keys(model):
            if key in state:  # a tied head is not saved
                state[key] = state[key].to(EMBEDDING_DTYPES[embedding_type])
    for name, d in layers.items():
        if d.quant is not None:
            state.update(quant_tensors(name, d.quant, dtype))
        else:
            state[f"{name}.weight"] = d.dense.to(dtype)
        if d.bias is not None:
            state[f"{name}.bias"] = d.bias.to(dtype)
    adapter = {n: d.lowrank for n, d in layers.items() if d.lowrank is not None}
    config = copy.deepcopy(model.config)
    config.quantization_config = qconfig
    with atomic_dir(out, overwrite) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if adapter:
            (tmp / ADAPTER_DIR).mkdir()
            cfg = peft_config(model, adapter, rslora=False, modules_to_save=[])
            cfg["base_model_name_or_path"] = str(out.resolve())
            save_file(peft_state(model, adapter, []), tmp / ADAPTER_DIR / PEFT_WEIGHTS,
                      metadata={"format": "pt"})
            (tmp / ADAPTER_DIR / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2))
    quantised = sum(d.quant is not None for d in layers.values())
    return {"path": str(out), "quantised_layers": quantised, "dense_layers": len(dense),
            "schemes": len(qconfig["config_groups"]), "adapter_layers": len(adapter),
            "embedding_type": embedding_type,
            "asymmetric": any(d.quant is not None and not d.quant.spec.sym
                              for d in layers.values()),
            "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}
