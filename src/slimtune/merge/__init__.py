"""Model merging: task vectors τᵢ = Wᵢ − W_base combined tensor by tensor by a registered method
(:data:`.registry.MERGES`, one file each).

:func:`merge_deltas` merges the task vectors of one tensor, :func:`merge_lora` the LoRA factors
of one layer without densifying them (the methods with a ``merge_factors`` hook). Importing this package registers
every built-in method once.
"""
from __future__ import annotations

import torch

from slimtune.merge import (breadcrumbs, compeft, dare, flora, knots,  # noqa: F401
                            linear, lora_lego, pcb, slerp, tall_masks, task_arithmetic, ties, tsv)
# (importing registers them)
from slimtune.merge.config import check_model_count
from slimtune.merge.registry import MERGES

__all__ = ["MERGES", "merge_deltas", "merge_lora"]


def merge_deltas(method: str, deltas: list[torch.Tensor], weights: list[float] | None = None,
                 base: torch.Tensor | None = None, **params) -> torch.Tensor:
    """The merged task vector of one tensor (add it to the base). ``deltas``: one τᵢ per model,
    all of one shape; ``weights``: one per model (default 1.0 each); ``params``: the method's
    keys (e.g. ``density=0.5``, ``**{"lambda": 0.7}``, ``seed=0``); validated first, one error
    naming every bad key. Deterministic for a given ``seed``. ``base``: the base tensor, for the
    methods whose result is not a function of the task vectors alone (``slerp``)."""
    if method not in MERGES:
        raise ValueError(MERGES.unknown(method))
    entry = MERGES.get(method)
    config = MERGES.make_config(method, "merge", **params)
    if not deltas:
        raise ValueError(f"merge ({method}): no task vectors given")
    check_model_count(config, len(deltas), "merge")
    shapes = {tuple(d.shape) for d in deltas}
    if len(shapes) != 1:
        raise ValueError(f"merge ({method}): task vectors of different shapes {sorted(shapes)}")
    if not all(d.is_floating_point() for d in deltas):
        raise ValueError(f"merge ({method}): task vectors must be floating point")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise ValueError(f"merge ({method}): {len(weights)} weights for {len(deltas)} task "
                         "vectors")
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *[1] * (stacked.dim() - 1))
    generator = torch.Generator(stacked.device).manual_seed(getattr(config, "seed", 0))
    return entry.hook("merge")(stacked, w, config, generator, base=base)


def merge_lora(method: str, factors: list[tuple[torch.Tensor, torch.Tensor]],
               weights: list[float] | None = None, **params) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged update ``(B, A)`` of one layer from one ``(Bᵢ, Aᵢ)`` per model (``ΔWᵢ =
    Bᵢ·Aᵢ``, any scale folded into ``Bᵢ``; ranks may differ), for the methods that merge in
    factored form (``linear``, ``task_arithmetic``, ``flora``, ``knots``, ``lora_lego``)."""
    if method not in MERGES:
        raise ValueError(MERGES.unknown(method))
    entry = MERGES.get(method)
    config = MERGES.make_config(method, "merge", **params)
    hook = entry.hook("merge_factors")
    if hook is None:
        known = [n for n in MERGES.names() if MERGES.get(n).hook("merge_factors") is not None]
        raise ValueError(f"merge ({method}): does not merge LoRA factors (those that do: "
                         f"{', '.join(known)}); merge the dense updates with merge_deltas")
    if not factors:
        raise ValueError(f"merge ({method}): no factors given")
    check_model_count(config, len(factors), "merge")
    for i, (B, A) in enumerate(factors):
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"merge ({method}): factors[{i}]: B {list(B.shape)} and A "
                             f"{list(A.shape)} do not multiply")
    shapes = {(B.shape[0], A.shape[1]) for B, A in factors}
    if len(shapes) != 1:
        raise ValueError(f"merge ({method}): updates of different shapes {sorted(shapes)}")
    weights = [1.0] * len(factors) if weights is None else list(weights)
    if len(weights) != len(factors):
        raise ValueError(f"merge ({method}): {len(weights)} weights for {len(factors)} updates")
    device = factors[0][0].device
    generator = torch.Generator(device).manual_seed(getattr(config, "seed", 0))
    return hook(factors, torch.tensor(weights, device=device), config, generator)
