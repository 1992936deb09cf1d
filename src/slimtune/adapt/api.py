"""Python API of the adapter methods: ``apply``, ``save``, ``load``, ``merge``, ``use_rank``.

- :func:`apply` wraps the targeted linears of a model as ``FactoredLinear`` layers initialised by
  the named method, freezes every other parameter, and records the method config on the model
  (``model.slimtune_adapter``).
- :func:`save` writes only the adapter: ``adapter.json`` (method config with its seed, base model
  name, per-layer structure, the names of the trainable parameters) and ``adapter.safetensors``
  (every non-base tensor of the adapted layers -- trainable factors, frozen generated or SVD
  factors, DoRA magnitudes, the ``origin`` of base-changing inits -- plus any other trainable
  parameter, e.g. a classification head trained in full). Atomic: temp dir, then rename.
- :func:`load` rebuilds the adapter on a fresh base model: the base weight of each layer is the
  fresh weight minus ``origin`` (no SVD or calibration is redone), the rest is loaded strictly.
  A layer saved without a base (a training parameterisation that replaces the weight: SLTrain,
  LOST, SST) is rebuilt from its saved parts alone; the fresh weight is not used.
- :func:`merge` folds every adapted layer into a plain ``nn.Linear``.
- :func:`use_rank` evaluates the adapter truncated to its first ``b`` components (DyLoRA's
  rank-b adapter; :func:`check_rank` checks a saved adapter for it before a model loads).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from slimtune.adapt.registry import AdapterConfig, get_method, make_config
from slimtune.io.atomic import atomic_dir
from slimtune.layers import FactoredLinear, empty_lowrank
from slimtune.progress import progress_bar
from slimtune.targets import factored_layers, match_targets, merge_factored, set_module
from slimtune.weights.precision import compute_dtype

FORMAT = 1
CONFIG_FILE, WEIGHTS_FILE = "adapter.json", "adapter.safetensors"


def adapter_config(model: nn.Module) -> AdapterConfig:
    record = getattr(model, "slimtune_adapter", None)
    if record is None:
        raise ValueError("this model has no slimtune adapter (use slimtune.adapt.apply or load)")
    return make_config(record["config"]["method"], **{k: v for k, v in record["config"].items()
                                                       if k != "method"})


def apply(model: nn.Module, method: str, r: int = 16, alpha: float = 32.0,
          targets="all-linear", calib: torch.Tensor | None = None, progress: bool = True,
          **params) -> nn.Module:
    """Adapt ``model`` in place with ``method`` and return it (see the module docstring).

    Everything that can be checked is checked before the model is touched: the config, the
    targets, ``r <= min(out, in)`` and the method's ``check_layer`` (densities that do not fit)
    for every targeted layer, and ``calib``."""
    config = make_config(method, r=r, alpha=alpha, targets=targets, **params)
    m = get_method(method)
    if getattr(model, "slimtune_adapter", None) is not None or factored_layers(model):
        raise ValueError("the model already has factored layers; apply one adapter to a plain "
                         "base model (merge the previous one first)")
    names = check_layers(model, config)
    prepare, plan, init_layer = m.hook("prepare"), m.hook("plan"), m.hook("init_layer")
    if prepare is not None and calib is None:
        raise ValueError(f"{method} is data-driven: pass calib=<LongTensor [n, seqlen] of token "
                         "windows> (e.g. slimtune.calib.calibration_windows)")
    if prepare is None and calib is not None:
        raise ValueError(f"{method} does not use calibration data; drop calib=")
    if calib is not None and (calib.ndim != 2 or calib.dtype != torch.long):
        raise ValueError(f"calib must be a LongTensor [n, seqlen], got {calib.dtype} "
                         f"{tuple(calib.shape)}")
    prepared = (prepare(model, names, config, calib, progress=progress) if prepare
                else plan(model, names, config) if plan else {})
    for p in model.parameters():
        p.requires_grad_(False)
    bar, task = progress_bar(len(names), f"{method} init (r={config.r})", progress)
    with bar:
        for name in names:
            linear = model.get_submodule(name)
            set_module(model, name, init_layer(name, linear, config, prepared.get(name)))
            bar.advance(task)
    model.slimtune_adapter = {"config": config.model_dump(), "layers": names}
    return model


def check_layers(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The names of the linears ``config`` targets in ``model``, after checking that each fits
    (``r`` within the method's rank limit, the method's ``check_layer``); raises ``ValueError``.
    Reads only shapes: ``model`` may be a weightless skeleton (the CLI checks before loading)."""
    method = config.method
    names = match_targets(model, config.targets)
    if not names:
        raise ValueError(f"{method}: targets {config.targets!r} match no linear layer in "
                         f"{type(model).__name__}")
    check_layer = get_method(method).hook("check_layer")
    for name in names:
        linear = model.get_submodule(name)
        limit = config.rank_limit(linear.out_features, linear.in_features)
        if config.r > limit:
            what = ("min(out, in)" if limit == min(linear.out_features, linear.in_features)
                    else "the largest rank")
            raise ValueError(f"{method}: r={config.r} exceeds {what} = {limit} of {name}")
        if check_layer is not None:
            check_layer(config, name, linear)
    return names


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def extra_loss(model: nn.Module) -> torch.Tensor | None:
    """The method's training-loss term (SORSA's regulariser) or None."""
    config = adapter_config(model)
    loss = get_method(config.method).hook("loss")
    return None if loss is None else loss(model, config)


def _run_hook(model: nn.Module, hook: str, *args) -> None:
    config = adapter_config(model)
    function = get_method(config.method).hook(hook)
    if function is not None:
        function(model, config, *args)


def before_step(model: nn.Module, step: int) -> None:
    """The method's ``before_step`` hook (before the step's first forward; DyLoRA's rank)."""
    _run_hook(model, "before_step", step)


def after_backward(model: nn.Module, step: int) -> None:
    """The method's ``after_backward`` hook (gradients present, before the optimiser step)."""
    _run_hook(model, "after_backward", step)


def after_step(model: nn.Module, step: int, optimizer=None) -> None:
    """The method's ``after_step`` hook (``optimizer``: the training loop's, whose state a
    method that moves or regrows entries resets for them; None outside the loop)."""
    _run_hook(model, "after_step", step, optimizer)


def finish(model: nn.Module) -> None:
    """The method's ``finish`` hook (training ended; before the adapter is written)."""
    _run_hook(model, "finish")


def method_state(model: nn.Module) -> dict:
    """The method's training state between steps (a dict of tensors and numbers it fills in;
    saved with training checkpoints, not with the adapter). The training loop sets
    ``total_steps`` (the run's number of optimiser steps) before the first step."""
    record = getattr(model, "slimtune_adapter", None)
    if record is None:
        raise ValueError("this model has no slimtune adapter (use slimtune.adapt.apply or load)")
    return record.setdefault("state", {})


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    layers = factored_layers(model)
    state = {}
    for name, layer in layers.items():
        for key, value in layer.state_dict().items():
            if not key.startswith("base."):
                state[f"{name}.{key}"] = value
    in_layers = tuple(f"{n}." for n in layers)
    for key, p in model.named_parameters():
        if p.requires_grad and not key.startswith(in_layers):
            state[key] = p.detach()
    return state


def save(model: nn.Module, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the adapter of ``model`` to ``out`` (see the module docstring)."""
    config = adapter_config(model)
    layers = factored_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the adapter is merged; unmerge it before saving the adapter alone")
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir())
                                               or (out / CONFIG_FILE).is_file())):
        raise ValueError(f"refusing to overwrite {out}: it is not a slimtune adapter directory "
                         "(nor an empty one)")
    state = {k: v.detach().contiguous().cpu() for k, v in _adapter_state(model).items()}
    hf_config = getattr(model, "config", None)
    manifest = {"format": FORMAT, "config": config.model_dump(),
                "base_model": getattr(hf_config, "_name_or_path", None),
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "layers": {n: layer.describe() for n, layer in layers.items()},
                "trainable": sorted(trainable_parameters(model))}
    with atomic_dir(out, overwrite) as tmp:
        save_file(state, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(manifest, indent=1))
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a slimtune adapter (needs {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE})")
    manifest = json.loads((path / CONFIG_FILE).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE}: unsupported format {manifest.get('format')!r}")
    return manifest


@torch.no_grad()
def load(base: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Put the adapter saved at ``path`` on ``base`` (in place) and return it.

    The manifest, the tensors and the base's layers are all checked before ``base`` changes."""
    from safetensors.torch import load_file

    manifest = read_manifest(path)
    config = make_config(manifest["config"]["method"],
                         **{k: v for k, v in manifest["config"].items() if k != "method"})
    if getattr(base, "slimtune_adapter", None) is not None or factored_layers(base):
        raise ValueError("the base model already has factored layers; load an adapter onto a "
                         "plain base model")
    try:
        state = load_file(Path(path) / WEIGHTS_FILE)
    except Exception as err:  # safetensors' own error type, for truncated or foreign files
        raise ValueError(f"{Path(path) / WEIGHTS_FILE} is not a readable safetensors file "
                         f"({err})") from None
    layers, params = {}, dict(base.named_parameters())
    for name, description in manifest["layers"].items():
        try:
            linear = base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: the base model has no layer {name!r}") from None
        if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != (
                description["out_features"], description["in_features"]):
            raise ValueError(f"{path}: {name} is not a matching nn.Linear in the base model")
        W = linear.weight
        layer = FactoredLinear.from_description(description, dtype=W.dtype, device=W.device)
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        expected = {k for k in layer.state_dict() if not k.startswith("base.")}
        if set(own) != expected:
            raise ValueError(f"{path}: tensors for {name} do not match adapter.json "
                             f"(missing {sorted(expected - set(own))[:4]}, unexpected "
                             f"{sorted(set(own) - expected)[:4]})")
        try:
            layer.load_state_dict(own, strict=False)
        except RuntimeError as err:  # shapes disagree with adapter.json
            raise ValueError(f"{path}: tensors for {name} do not match adapter.json: "
                             f"{str(err).splitlines()[-1].strip()}") from None
        layers[name] = (linear, layer)
    rest = {k: v for k, v in state.items()
            if not any(k.startswith(f"{n}.") for n in manifest["layers"])}
    unexpected = [k for k, v in rest.items() if k not in params or params[k].shape != v.shape]
    if unexpected:
        raise ValueError(f"{path}: the base model has no parameters matching {unexpected[:4]}")
    known = set(params) | {f"{n}.{k}" for n, (_, layer) in layers.items()
                           for k, _ in layer.named_parameters()}
    unknown = [k for k in manifest["trainable"] if k not in known]
    if unknown:
        raise ValueError(f"{path}: trainable parameters {unknown[:4]} are not in the base model")

    for p in base.parameters():
        p.requires_grad_(False)
    for name, (linear, layer) in layers.items():
        W = linear.weight
        if layer.origin is not None:
            dtype = compute_dtype(W)  # as adapted_linear computed it
            delta = layer.origin.delta_weight().to(dtype)
            layer.base.weight.data = (W.to(dtype) - delta).to(W.dtype)
        elif layer.base is not None:  # a layer without one (SLTrain, LOST, SST) ignores W
            layer.base.weight.data = W.data
        if layer.bias is not None:
            layer.bias.data = linear.bias.data
        set_module(base, name, layer)
    for k, v in rest.items():
        params[k].data = v.to(params[k])
    params = dict(base.named_parameters())
    trainable = set(manifest["trainable"])
    for key, p in params.items():  # frozen factors stay frozen, trainable ones train
        p.requires_grad_(key in trainable)
    base.slimtune_adapter = {"config": config.model_dump(), "layers": list(manifest["layers"])}
    return base


def _check_rank(parts: dict[str, nn.Module | None], b: int, where: str) -> None:
    """``ValueError`` unless every low-rank part can be truncated to its first ``b`` components."""
    fixed = [n for n, p in parts.items() if p is None or not hasattr(p, "use_rank")]
    if fixed:
        kinds = sorted({type(parts[n]).__name__ for n in fixed})
        raise ValueError(f"{where}: layers {fixed[:3]} have no low-rank part that can be "
                         f"truncated to a rank ({', '.join(kinds)}); an adapter rank needs "
                         "LoRA-like factors (DyLoRA, LoRA, ...)")
    smallest = min(p.rank for p in parts.values())
    if not 1 <= b <= smallest:
        raise ValueError(f"{where}: adapter rank {b} is not in [1, {smallest}] (the smallest "
                         "rank of the adapter's layers)")


def check_rank(path: str | os.PathLike, b: int) -> None:
    """:func:`use_rank`'s checks on the adapter saved at ``path``, before any model loads."""
    manifest = read_manifest(path)
    parts = {name: None if d.get("lowrank") is None else
             empty_lowrank(d["lowrank"], d["in_features"], d["out_features"], {"device": "meta"})
             for name, d in manifest["layers"].items()}
    _check_rank(parts, b, str(path))


def use_rank(model: nn.Module, b: int | None) -> nn.Module:
    """Use only the first ``b`` components of every adapted layer's low-rank part in forward and
    merge (DyLoRA's part then scales by alpha/b; a plain ``LowRank`` keeps its scale); None uses
    all again. A runtime choice: not saved. Returns the model."""
    layers = factored_layers(model)
    if not layers:
        raise ValueError("this model has no adapted layers")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the adapter is merged; unmerge it before choosing its rank")
    parts = {name: layer.lowrank for name, layer in layers.items()}
    if b is not None:
        _check_rank(parts, b, "use_rank")
    for part in parts.values():
        part.use_rank(b)
    return model


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapted layer into a plain ``nn.Linear`` (in place); returns the model."""
    merge_factored(model)
    model.slimtune_adapter = None
    return model
