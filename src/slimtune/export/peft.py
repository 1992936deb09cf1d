"""Export an adapted model as a Hugging Face PEFT LoRA adapter (``adapter_config.json`` +
``adapter_model.safetensors``), so that ``peft.PeftModel.from_pretrained(original_base, out)``
computes what the slimtune model computes.

Each ``FactoredLinear`` is exported from its structure, not from the method's name:

- plain low-rank update on the original weight (LoRA, rsLoRA, EVA): ``ΔW = s·B·K·A`` becomes
  ``lora_B = B``, ``lora_A = K·A`` (a diagonal or full core is folded into A) with PEFT's scaling
  equal to ``s``; ``lora_alpha = s·r`` (``s·sqrt(r)`` and ``use_rslora`` for rsLoRA adapters).
  Layers whose rank or scale differ from the most common one go to ``rank_pattern`` /
  ``alpha_pattern`` (EVA's redistributed ranks).
- base-changing inits (the layer has an ``origin``: PiSSA, MiLoRA, OLoRA, CorDA, SVFit, SORSA):
  the base is ``W - s0·B0·K0·A0``, which PEFT cannot hold, so the export is the equivalent LoRA
  on the *original* weight, of rank ``r + r0``::

      ΔW = s·B·K·A - s0·B0·K0·A0 = s·[B, B0]·[K·A ; -(s0/s)·K0·A0]

  (PEFT's own "convert PiSSA to LoRA" does the same). Outputs match; training the export further
  in PEFT trains all ``r + r0`` components, not the method's original parameterisation.
- DoRA (the layer's transform is :class:`~slimtune.layers.WeightNormScale`): ``use_dora`` with the
  magnitude as ``lora_magnitude_vector``; both libraries normalise the rows of the combined weight
  ``W + ΔW`` the same way. DoRA is one flag for the whole PEFT adapter, so either every exported
  layer has the transform or none has.
- other trainable parameters (a head or norm trained in full) go to ``modules_to_save``.

Not exportable (``ValueError`` naming the layer and the reason, raised before anything is
written): a sparse part (SFT, SaRA, DSEE, SLTrain: PEFT's LoRA has no sparse delta), a mask or a
non-dense base (pruned or quantised bases: PEFT applies the adapter to the original dense weight),
low-rank parts that have no LoRA form (a plain ``LowRank`` has one, and so has every part that
gives ``lora_factors()``: VeRA, NOLA and MiSS export as the exact LoRA of their update), other
transforms, merged layers (unmerge first), and layers without a base (compressed to pure
low-rank). Any method that only produces the structures above exports exactly.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from slimtune.io.atomic import atomic_dir
from slimtune.layers import DenseBase, FactoredLinear, LowRank, WeightNormScale
from slimtune.models import is_causal_lm
from slimtune.targets import factored_layers
from slimtune.weights.precision import compute_dtype

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass
class PeftLayer:
    """One exported layer: ``ΔW = scaling·B·A`` on the original weight, DoRA magnitude or None."""

    A: Tensor          # [r, in]
    B: Tensor          # [out, r]
    scaling: float
    magnitude: Tensor | None

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def folded_factors(lowrank: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(B, K·A)`` in ``dtype``: the core folded into A, so that ``s·B·(K·A)`` is the update (a
    part with regenerated factors gives its own ``lora_factors()``)."""
    if not isinstance(lowrank, LowRank):
        B, A = lowrank.lora_factors()
        return B.detach().to(dtype), A.detach().to(dtype)
    A, B = (t.detach().to(dtype) for t in lowrank.factors())  # the rank in use (DyLoRA)
    K = lowrank.core_used()
    if K is not None:
        K = K.detach().to(dtype)
        A = K[:, None] * A if K.dim() == 1 else K @ A
    return B, A


def _unsupported(layer: FactoredLinear) -> str | None:
    """Why PEFT cannot express this layer, or None."""
    if layer.merged:
        return "it is merged (call unmerge() first)"
    if layer.base is None:
        return "it has no base weight (PEFT adds LoRA to an existing dense weight)"
    if not isinstance(layer.base, DenseBase):
        return (f"its base is {getattr(layer.base, 'kind', type(layer.base).__name__)!r}, not "
                "dense (PEFT applies the adapter to the original dense weight)")
    if layer.mask is not None:
        return "it has a mask on the base (PEFT applies the adapter to the unmasked weight)"
    if layer.sparse is not None:
        return "it has a sparse part (PEFT's LoRA has no sparse delta)"
    for what, part in (("low-rank part", layer.lowrank), ("origin", layer.origin)):
        if part is not None and not isinstance(part, LowRank) and \
                not hasattr(part, "lora_factors"):
            return (f"its {what} is a {type(part).__name__}, which has no LoRA form "
                    "(lora_factors)")
    if layer.transform is not None and not isinstance(layer.transform, WeightNormScale):
        return f"its transform {type(layer.transform).__name__} has no PEFT equivalent"
    if layer.lowrank is None and layer.origin is None:
        return "it has no low-rank part"
    return None


@torch.no_grad()
def peft_layer(name: str, layer: FactoredLinear) -> PeftLayer:
    """The PEFT LoRA equivalent of one adapted layer (see the module docstring)."""
    reason = _unsupported(layer)
    if reason is not None:
        raise ValueError(f"cannot export layer {name!r} to PEFT: {reason}")
    ref = layer.base.dense_weight()
    dtype = compute_dtype(ref)
    terms = []  # (coefficient, B, A) with ΔW = Σ coefficient·B·A
    if layer.lowrank is not None:
        terms.append((layer.lowrank.scale, *folded_factors(layer.lowrank, dtype)))
    if layer.origin is not None:
        terms.append((-layer.origin.scale, *folded_factors(layer.origin, dtype)))
    scaling = abs(terms[0][0])
    if scaling == 0:
        raise ValueError(f"cannot export layer {name!r} to PEFT: its low-rank scale is 0")
    B = torch.cat([b for _, b, _ in terms], dim=1)
    A = torch.cat([a if c == scaling else a * (c / scaling) for c, _, a in terms], dim=0)
    magnitude = None
    if layer.transform is not None:
        magnitude = layer.transform.magnitude.detach().clone()
    return PeftLayer(A.to(ref.dtype).contiguous(), B.to(ref.dtype).contiguous(), scaling,
                     magnitude)


def _trainable_modules(model: nn.Module, layers: dict[str, FactoredLinear]) -> list[str]:
    """Modules outside the adapted layers that hold trainable parameters (PEFT's
    ``modules_to_save``)."""
    in_layers = tuple(f"{n}." for n in layers)
    names = []
    for key, p in model.named_parameters():
        if p.requires_grad and not key.startswith(in_layers):
            owner = key.rpartition(".")[0]
            if not owner:
                raise ValueError(f"cannot export trainable parameter {key!r} to PEFT: it belongs "
                                 "to the model itself, not to a submodule")
            if owner not in names:
                names.append(owner)
    return names


def _alpha(scaling: float, r: int, rslora: bool) -> float:
    return scaling * (math.sqrt(r) if rslora else r)


def peft_config(model: nn.Module, exported: dict[str, PeftLayer], rslora: bool,
                modules_to_save: list[str]) -> dict:
    """The ``adapter_config.json`` contents (PEFT ``LoraConfig`` fields)."""
    shapes = {n: (e.rank, _alpha(e.scaling, e.rank, rslora)) for n, e in exported.items()}
    r, alpha = Counter(shapes.values()).most_common(1)[0][0]
    dora = {e.magnitude is not None for e in exported.values()}
    if len(dora) > 1:
        raise ValueError("cannot export to PEFT: some layers use DoRA and some do not (PEFT's "
                         f"use_dora is one flag; DoRA layers: "
                         f"{[n for n, e in exported.items() if e.magnitude is not None][:4]})")
    hf_config = getattr(model, "config", None)
    causal = is_causal_lm(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if causal else None,
        "auto_mapping": None if causal else {"base_model_class": type(model).__name__,
                                             "parent_library": type(model).__module__},
        "base_model_name_or_path": getattr(hf_config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(exported),
        "rank_pattern": {n: s[0] for n, s in shapes.items() if s[0] != r},
        "alpha_pattern": {n: s[1] for n, s in shapes.items() if s[1] != alpha},
        "use_rslora": rslora,
        "use_dora": dora == {True},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
    }


def peft_state(model: nn.Module, exported: dict[str, PeftLayer],
               modules_to_save: list[str]) -> dict[str, Tensor]:
    """The ``adapter_model.safetensors`` tensors under PEFT's key names."""
    state = {}
    for name, e in exported.items():
        state[f"{PREFIX}{name}.lora_A.weight"] = e.A
        state[f"{PREFIX}{name}.lora_B.weight"] = e.B
        if e.magnitude is not None:
            state[f"{PREFIX}{name}.lora_magnitude_vector"] = e.magnitude
    for name in modules_to_save:
        for key, value in model.get_submodule(name).state_dict().items():
            state[f"{PREFIX}{name}.{key}"] = value.detach()
    return {k: v.contiguous().cpu() for k, v in state.items()}


def to_peft(model: nn.Module, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model``'s adapter to ``out`` in PEFT's LoRA format and return the path.

    Every layer is checked before anything is written; ``out`` is written to a temp dir in the
    same parent and then renamed into place (``FileExistsError`` unless ``overwrite``).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a directory")
    layers = factored_layers(model)
    if not layers:
        raise ValueError("the model has no adapted (FactoredLinear) layers to export")
    exported = {name: peft_layer(name, layer) for name, layer in layers.items()}
    # a layer whose update has rank 0 (AdaLoRA pruned all its triplets) changes nothing, and
    # PEFT's LoRA needs r >= 1: it is left out
    exported = {name: e for name, e in exported.items() if e.rank > 0 or e.magnitude is not None}
    if not exported:
        raise ValueError("cannot export to PEFT: every adapted layer has rank 0 (no update)")
    record = getattr(model, "slimtune_adapter", None) or {}
    rslora = bool(record.get("config", {}).get("rslora", False))
    modules_to_save = _trainable_modules(model, layers)
    config = peft_config(model, exported, rslora, modules_to_save)
    state = peft_state(model, exported, modules_to_save)

    from safetensors.torch import save_file

    with atomic_dir(out, overwrite) as tmp:
        save_file(state, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return out
