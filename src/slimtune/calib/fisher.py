"""Fisher diagonals of a causal LM's calibration loss (FWSVD's weight importances).

:func:`fisher_diagonals` back-propagates the mean next-token loss of each calibration batch
through the full model, squaring each named weight's gradient into a running sum as soon as it
is ready, so only one gradient exists at a time.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from slimtune.evaluate import model_device
from slimtune.models import is_causal_lm
from slimtune.progress import progress_bar
from slimtune.weights.stats import FisherDiagonal


def _take_grad(acc: FisherDiagonal, weight: torch.Tensor) -> None:
    acc.update(weight.grad)
    weight.grad = None


def fisher_diagonals(model: nn.Module, windows: torch.Tensor, names, batch_size: int = 1,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """Per named linear, the mean over batches of grad² of the causal-LM loss w.r.t. its weight.

    ``model(input_ids=batch, labels=batch).loss`` (mean next-token NLL of the batch) is
    back-propagated once per batch with only the named weights requiring gradients; each weight's
    gradient is squared into a float32 :class:`FisherDiagonal` as soon as it is ready and dropped,
    so only one gradient exists at a time. Returns ``{name: [out, in]}`` on the model's device.
    """
    if not len(windows) or batch_size < 1:
        raise ValueError(f"need at least one window and batch_size >= 1, got {len(windows)}, "
                         f"{batch_size}")
    if not is_causal_lm(model):
        raise ValueError(f"Fisher diagonals need a causal LM (loss on next tokens); "
                         f"{type(model).__name__} is not one (an encoder has no LM loss)")
    weights = {n: model.get_submodule(n).weight for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    old_grads = {n: w.grad for n, w in weights.items()}
    acc = {n: FisherDiagonal(w.shape, torch.float32, w.device) for n, w in weights.items()}
    windows = windows.to(model_device(model))
    was_training = model.training
    model.eval()
    bar, task = progress_bar(len(windows), f"fisher ({len(windows)}×{windows.shape[1]})", progress)
    handles = []
    try:
        for p in flags:
            p.requires_grad_(False)
        for n, w in weights.items():
            w.requires_grad_(True)
            w.grad = None
            handles.append(w.register_post_accumulate_grad_hook(partial(_take_grad, acc[n])))
        with bar, torch.enable_grad():
            for s in range(0, len(windows), batch_size):
                batch = windows[s:s + batch_size]
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
                bar.advance(task, len(batch))
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for n, w in weights.items():
            w.grad = old_grads[n]
        model.train(was_training)
    # divide in place (no second copy of every Fisher matrix), dropping each accumulator as we go
    return {n: (a := acc.pop(n)).sq_grad_sum.div_(a.count) for n in list(acc)}
