"""What each compressed layer becomes in a deployable format (compressed-tensors, GGUF), shared by
their writers.

A :class:`~slimtune.layers.FactoredLinear` splits into at most two things a reader can load:

- its base: integers on a quantisation grid (:class:`QuantWeight`, from a packed base; a pruning
  mask sets the dropped integers to the zero point, so they dequantise to exactly 0), or one dense
  float weight into which everything else that is exact to fold has been folded (mask, low-rank,
  sparse part, DoRA-style transform);
- beside a quantised base only: its low-rank part ``s·B·K·A``, as a PEFT LoRA layer
  (:class:`~slimtune.export.peft.PeftLayer`, the core folded into A) that goes to an adapter.

What no format holds beside a quantised base -- a sparse part (the ``outliers`` step), a transform,
generated low-rank factors, a merged layer -- is an error naming the layer; :func:`deploy_layers`
checks every layer before anything is written and reports all of them at once. ``fold=True``
(f16/f32 GGUF, dense export) folds everything into the dense weight instead, quantised bases
included (dequantised).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slimtune.export.peft import PeftLayer, folded_factors
from slimtune.layers import FactoredLinear, LowRank, PackedQuantBase
from slimtune.targets import factored_layers
from slimtune.weights.quant import Grid, QuantSpec, dequantize


class DeployError(ValueError):
    """Layers a format cannot hold; ``problems`` maps each layer name to the reason."""

    def __init__(self, what: str, problems: dict[str, str]):
        self.problems = problems
        shown = "; ".join(f"{n}: {why}" for n, why in list(problems.items())[:6])
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        super().__init__(f"{what} cannot hold {len(problems)} layer(s): {shown}{more}")


@dataclass
class QuantWeight:
    """Signed integers ``q [out, in]`` (int32) on ``(scale, zero) [out, groups]`` of ``spec``."""

    q: Tensor
    scale: Tensor
    zero: Tensor
    spec: QuantSpec

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.q, Grid(self.spec, self.scale, self.zero), dtype=dtype)


@dataclass
class DeployLayer:
    """One layer for a writer: exactly one of ``quant`` / ``dense``, the optional low-rank part
    beside a quantised base, and the bias."""

    quant: QuantWeight | None
    dense: Tensor | None
    lowrank: PeftLayer | None
    bias: Tensor | None


@torch.no_grad()
def quant_weight(layer: FactoredLinear) -> QuantWeight:
    """The integers of ``layer``'s packed base, masked entries set to their zero point."""
    base = layer.base
    q, zero = base.integers(), base.zero.to(torch.int32)
    if layer.mask_bits is not None:
        g = base.spec.group_width(layer.in_features)
        q = torch.where(layer.mask, q, zero.repeat_interleave(g, dim=1))
    return QuantWeight(q, base.scale.detach().clone(), zero, base.spec)


def _quant_problem(layer: FactoredLinear) -> str | None:
    if layer.merged:
        return "it is merged into a quantised base"
    if layer.sparse is not None:
        return (f"it has a sparse part ({layer.sparse.nnz} kept weights, e.g. from the outliers "
                "step) beside its quantised base, which no format holds")
    if layer.transform is not None:
        return f"its {type(layer.transform).__name__} transform cannot apply to a quantised base"
    if layer.lowrank is not None and not isinstance(layer.lowrank, LowRank):
        return (f"its low-rank part is a {type(layer.lowrank).__name__}, not a plain LowRank "
                "(generated factors have no LoRA equivalent)")
    return None


@torch.no_grad()
def deploy_layer(layer: FactoredLinear, fold: bool = False) -> DeployLayer | str:
    """The :class:`DeployLayer` of ``layer``, or the reason it cannot be one."""
    bias = None if layer.bias is None else layer.bias.detach()
    if fold or not isinstance(layer.base, PackedQuantBase):
        return DeployLayer(None, layer.dense_weight().detach(), None, bias)
    why = _quant_problem(layer)
    if why is not None:
        return why
    lowrank = None
    if layer.lowrank is not None:
        B, A = folded_factors(layer.lowrank, layer.base.scale.dtype)
        lowrank = PeftLayer(A.contiguous(), B.contiguous(), layer.lowrank.scale, None)
    return DeployLayer(quant_weight(layer), None, lowrank, bias)


def deploy_layers(model: nn.Module, what: str, fold: bool = False) -> dict[str, DeployLayer]:
    """:func:`deploy_layer` of every factored layer; a :class:`DeployError` listing all that
    ``what`` (the format's name) cannot hold."""
    done, problems = {}, {}
    for name, layer in factored_layers(model).items():
        result = deploy_layer(layer, fold)
        if isinstance(result, str):
            problems[name] = result
        else:
            done[name] = result
    if problems:
        raise DeployError(what, problems)
    return done
