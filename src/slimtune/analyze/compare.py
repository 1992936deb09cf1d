"""``slimtune compare``'s analysis: fine-tuned versions of one base model, weight by weight.

For every selected linear layer (all but embeddings and the LM head) of every model, against the
base weight ``W_0``: the intruder dimensions of ``W_t`` (:mod:`.intruders`), the spectrum,
effective and stable rank and energy of ``ΔW = W_t - W_0`` (:mod:`.delta_spectra`), and the
alignment of ``ΔW``'s top-``k`` singular subspaces with ``W_0``'s and with the other models'
(:mod:`.alignment`); then, on a text, perplexity and the Matrix Nuclear-Norm from the same windows
(:mod:`.nuclear_norm`). A model is a Hugging Face directory (e.g. a full fine-tune) or a slimtune
adapter directory, merged into a copy of the base for its dense weights (:func:`tuned_model`).

The base is decomposed once (all its left singular vectors are kept for the intruder test); each
model is then loaded, measured and dropped before the next, so memory holds the base, its
singular vectors and one model. Layers a model left unchanged (an adapter's untargeted layers)
cost nothing and have no spectrum. SVDs run in one thread, as in :mod:`.spectra`.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from slimtune.analyze import alignment, intruders
from slimtune.analyze.delta_spectra import norms, spectrum_summary
from slimtune.analyze.spectra import layer_type_and_depth
from slimtune.layers import FactoredLinear
from slimtune.progress import progress_bar
from slimtune.targets import match_targets
from slimtune.weights.subspaces import thin_svd as svd
from slimtune.weights.svd import gram_svd


@dataclass(frozen=True)
class CompareSettings:
    """``k``/``epsilon``: intruder test; ``align_k``: subspace size for the alignment."""

    k: int = intruders.DEFAULT_K
    epsilon: float = intruders.DEFAULT_EPSILON
    align_k: int = alignment.DEFAULT_K
    targets: str = "all-linear"

    def __post_init__(self):
        intruders.check_settings(self.k, self.epsilon)
        if isinstance(self.align_k, bool) or not isinstance(self.align_k, int) or self.align_k < 1:
            raise ValueError(f"align_k must be an int >= 1, got {self.align_k!r}")


@dataclass
class BaseLayer:
    weight: torch.Tensor  # float32 [out, in]
    U: torch.Tensor  # all left singular vectors [out, min(out, in)]
    top: alignment.Subspaces  # (U_k, V_k) with k = align_k
    norm: float


@contextlib.contextmanager
def one_thread():
    """SVDs of these small matrices in one thread (see :func:`.spectra.layer_spectra`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def linear_weights(model: nn.Module, targets: str = "all-linear") -> dict[str, torch.Tensor]:
    """``{name: float32 CPU weight}`` of the selected linears (dense weight of factored ones)."""
    names = match_targets(model, targets, include_factored=True)
    if not names:
        raise ValueError(f"targets {targets!r} match no linear layer in {type(model).__name__}")
    weights = {}
    for name in names:
        module = model.get_submodule(name)
        W = module.dense_weight() if isinstance(module, FactoredLinear) else module.weight
        weights[name] = W.detach().to("cpu", torch.float32)
    return weights


def analyse_base(weights: dict[str, torch.Tensor], settings: CompareSettings,
                 progress: bool = True) -> dict[str, BaseLayer]:
    """The base's singular vectors, once per layer."""
    layers = {}
    bar, task = progress_bar(len(weights), "base singular vectors", progress)
    with bar, one_thread(), torch.no_grad():
        for name, W in weights.items():
            U, _, Vh = svd(W)
            k = min(settings.align_k, U.shape[1])
            layers[name] = BaseLayer(W, U, (U[:, :k], Vh[:k].mT), float(torch.linalg.norm(W)))
            bar.advance(task)
    return layers


def analyse_layer(name: str, base: BaseLayer, W: torch.Tensor, settings: CompareSettings
                  ) -> tuple[dict, alignment.Subspaces | None]:
    """One layer's report row and its update's top subspaces (None if unchanged)."""
    layer_type, depth = layer_type_and_depth(name)
    row = {"name": name, "type": layer_type, "depth": depth, "shape": list(W.shape)}
    delta = W - base.weight
    if not bool(delta.any()):
        row.update(changed=False, delta_norm=0.0, relative_change=0.0, base_norm=base.norm,
                   intruders=0, best_match=None, align_base_left=None, align_base_right=None,
                   align_k=0, align_base_angles=None, singular_values=None, **spectrum_summary(torch.zeros(1)))
        return row, None
    U, S, Vh = svd(delta)
    k = max(1, min(settings.align_k, int((S > alignment.RANK_TOL * S[0]).sum())))
    top = (U[:, :k], Vh[:k].mT)
    U_tuned = gram_svd(W, min(settings.k, min(W.shape)))[0]
    matches = intruders.best_matches(U_tuned, base.U).tolist()
    versus_base = alignment.layer_alignment(top, base.top, angles=True)
    row.update(changed=True, **norms(delta, base.weight), base_norm=base.norm,
               intruders=intruders.count_below(matches, settings.epsilon),
               best_match=[round(m, 6) for m in matches],
               align_base_left=versus_base["left"], align_base_right=versus_base["right"],
               align_k=k, align_base_angles={"left": versus_base["left_angles"],
                                             "right": versus_base["right_angles"]},
               singular_values=S, **spectrum_summary(S))
    return row, top


def analyse_model(base: dict[str, BaseLayer], weights: dict[str, torch.Tensor],
                  settings: CompareSettings, label: str = "model", progress: bool = True
                  ) -> tuple[list[dict], dict[str, alignment.Subspaces | None]]:
    """Rows (model order) and update subspaces of one model's weights against the base's."""
    missing, extra = sorted(set(base) - set(weights)), sorted(set(weights) - set(base))
    if missing or extra:
        raise ValueError(f"{label}: its linear layers differ from the base's (missing "
                         f"{missing[:3]}, not in the base {extra[:3]})")
    rows, subspaces = [], {}
    bar, task = progress_bar(len(base), f"weights of {label}", progress)
    with bar, one_thread(), torch.no_grad():
        for name, layer in base.items():
            W = weights[name]
            if W.shape != layer.weight.shape:
                raise ValueError(f"{label}: {name} has shape {list(W.shape)}, the base's is "
                                 f"{list(layer.weight.shape)}")
            row, subspaces[name] = analyse_layer(name, layer, W, settings)
            rows.append(row)
            bar.advance(task)
    return rows, subspaces


def summarise(rows: list[dict]) -> dict:
    """Model-level numbers from its layer rows."""
    changed = [r for r in rows if r["changed"]]

    def mean(key):
        values = [r[key] for r in changed if r[key] is not None]
        return sum(values) / len(values) if values else None

    def median(key):
        values = sorted(r[key] for r in changed)
        return values[len(values) // 2] if values else None

    delta_sq = sum(r["delta_norm"] ** 2 for r in rows)
    base_sq = sum(r["base_norm"] ** 2 for r in rows)
    return {"layers": len(rows), "changed_layers": len(changed),
            "intruders": sum(r["intruders"] for r in rows),
            "layers_with_intruders": sum(1 for r in rows if r["intruders"]),
            "relative_change": (delta_sq / base_sq) ** 0.5 if base_sq > 0 else None,
            "delta_effective_rank_median": median("effective_rank"),
            "delta_stable_rank_median": median("stable_rank"),
            "energy_r8_mean": mean("energy_r8"), "energy_r32_mean": mean("energy_r32"),
            "align_base_left_mean": mean("align_base_left"),
            "align_base_right_mean": mean("align_base_right")}


def model_identity(name: str | os.PathLike) -> str:
    """A registered model's name, also for its converted or packaged directory; else the
    resolved path (to tell whether an adapter was trained on a given base)."""
    from slimtune.models import MODEL_NAMES, ModelNotFoundError, cache_root, minilm_dir

    name = str(name)
    if name in MODEL_NAMES:
        return name
    path = Path(name).expanduser().resolve()
    known = {cache_root() / "models" / "smollm2-135m": "smollm2-135m"}
    with contextlib.suppress(ModelNotFoundError):
        known[minilm_dir()] = "minilm-l6"
    return next((label for p, label in known.items() if p.resolve() == path), str(path))


def tuned_model(base_model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """The dense fine-tuned model at ``path``: an adapter directory (``adapter.json``) merged
    into a copy of ``base_model``, or a model directory (:func:`slimtune.models.load_model`)."""
    from slimtune import adapt
    from slimtune.models import load_model

    if (Path(path) / "adapter.json").is_file():
        return adapt.merge(adapt.load(copy.deepcopy(base_model), path))
    return load_model(path)[0]


def run_compare(base_model: nn.Module, models: dict[str, str], settings: CompareSettings,
                token_ids: torch.Tensor | None = None, seqlen: int = 512,
                eval_tokens: int | None = 8192, batch_size: int = 1, progress: bool = True,
                load=tuned_model) -> dict:
    """Everything ``slimtune compare`` reports, for ``models`` (``{label: path}``) against
    ``base_model``; with ``token_ids``, perplexity and Matrix Nuclear-Norm of the base and of each
    model on the same windows. Returns ``{"settings", "models", "summary", "layers", "alignment",
    "eval"}``; the rows in ``"layers"`` still hold their ``singular_values`` tensors."""
    from slimtune.analyze.nuclear_norm import nuclear_norm_and_perplexity

    def evaluate(model):
        if token_ids is None:
            return None
        return nuclear_norm_and_perplexity(model, token_ids, seqlen=seqlen, max_tokens=eval_tokens,
                                           batch_size=batch_size, progress=progress)

    base = analyse_base(linear_weights(base_model, settings.targets), settings, progress)
    results = {"eval": {alignment.BASE_LABEL: evaluate(base_model)}, "layers": {},
               "summary": {}}
    updates = {}
    for label, path in models.items():
        model = load(base_model, path)
        weights = linear_weights(model, settings.targets)
        rows, updates[label] = analyse_model(base, weights, settings, label, progress)
        results["layers"][label] = rows
        results["summary"][label] = summarise(rows)
        results["eval"][label] = evaluate(model)
        del model, weights
        gc.collect()
    base_top = {name: layer.top for name, layer in base.items()}
    return {"settings": asdict(settings), "models": dict(models), **results,
            "alignment": alignment.alignment_matrix(base_top, updates)}
