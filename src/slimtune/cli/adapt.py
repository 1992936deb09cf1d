"""``slimtune adapt``: fine-tune a model with an adapter method (or in full) and save the result.

Like the other commands it only parses,
validates and prints: every argument (method and its parameters, training settings, data set,
model/task fit, output directory) is checked before the model is loaded, and bad input prints one
``error: ...`` line and exits with code 2. The work is :func:`slimtune.train.train`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

from slimtune.cli.app import (check_data, check_model, check_output, command, fail, load_or_fail,
                              stdout)
from slimtune.train.config import TrainConfig

_DEFAULT = {name: field.default for name, field in TrainConfig.model_fields.items()}
_NAMES = re.compile(r"[A-Za-z0-9_.]+(,[A-Za-z0-9_.]+)*")
_COMMON = ("method", "r", "alpha", "targets", "seed")  # adapter fields with their own options

ADAPT_HELP = (
    "Fine-tune a model with an adapter method (or all its weights) and save the adapter.\n\n"
    "Causal-LM training (--data austen|ptb|finefoods-text): random windows of --seqlen tokens (default 256) from "
    "the train split; perplexity on the first --eval-tokens tokens of the test split. "
    "Classification (--task finefoods, an encoder such as minilm-l6): a mean-pooled linear head "
    "that trains in full, reviews truncated to --seqlen tokens (default 128); accuracy on the "
    "first --eval-examples test reviews. One optimiser step sees --batch x --grad-accum "
    "examples; AdamW (or --optimizer) with linear warmup then cosine decay, gradient clipping. Data-driven "
    "methods get --calib-n calibration windows from the train split (or from --calib-data's). "
    "--method full trains "
    "every parameter (reference; --r/--alpha/--targets are then unused).\n\n"
    "OUT ends up holding the adapter (adapter.json + adapter.safetensors, for "
    "slimtune.adapt.load; a Hugging Face model directory for --method full) and history.json "
    "(loss, lr, evaluations, seconds per step, peak RSS), written atomically. --save-every K "
    "keeps the latest checkpoint in OUT/checkpoints; --resume continues from it.\n\n"
    "Example: slimtune adapt -m smollm2-135m --method lora --data austen --steps 200 -o out/lora")


def parse_targets(value: str):
    """``all-linear``; comma-separated plain names (``q_proj,v_proj``) -> a list; else a regex."""
    if value != "all-linear" and _NAMES.fullmatch(value):
        return value.split(",")
    return value


def adapter_from_flags(method: str, params: dict, r: int, alpha: float, targets: str, seed: int):
    """The adapter config of ``--method`` and its options, or None for ``full``; a clear error
    for an unknown method or a bad key."""
    from slimtune.adapt import known_methods, make_config

    if method == "full":
        if params:
            fail("--method full takes no --param")
        return None
    if method not in known_methods():
        fail(f"unknown method {method!r}: use one of {', '.join(known_methods())} or full")
    try:
        return make_config(method, r=r, alpha=alpha, targets=parse_targets(targets), seed=seed,
                           **params)
    except ValueError as err:
        fail(str(err))


def parse_params(items: List[str], fail, flag: str = "--param",
                 own: tuple[str, ...] = _COMMON) -> dict:
    """``key=value`` strings -> a dict; values are read as YAML scalars (``3``, ``0.5``,
    ``true``, ``exact``); keys in ``own`` have their own options."""
    import yaml

    params = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            fail(f"{flag} expects key=value, got {item!r}")
        if key in own:
            fail(f"{flag} {key}=...: use --{key.replace('_', '-')} instead")
        if key in params:
            fail(f"{flag} {key} is given twice")
        try:
            params[key] = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            params[key] = raw
    return params


def parse_hooks(names: List[str], items: List[str], fail) -> list[dict]:
    """``--hook NAME`` and ``--hook-param NAME.key=value`` -> ``[{"method": NAME, **keys}]``
    (values read as by :func:`parse_params`)."""
    hooks: dict[str, dict] = {}
    for name in names:
        if name in hooks:
            fail(f"--hook {name} is given twice")
        hooks[name] = {"method": name}
    for item in items:
        target, sep, value = item.partition("=")
        name, dot, key = (part.strip() for part in target.partition("."))
        if not sep or not dot or not name or not key:
            fail(f"--hook-param expects NAME.key=value, got {item!r}")
        if name not in hooks:
            fail(f"--hook-param {item}: pass --hook {name} to use that hook")
        if key == "method" or key in hooks[name]:
            fail(f"--hook-param {name}.{key}: " + ("name hooks with --hook" if key == "method"
                                                     else "given twice"))
        hooks[name][key] = parse_params([f"{key}={value}"], fail, "--hook-param", ())[key]
    return list(hooks.values())


def per_process_batch(batch: int, global_batch: int | None, grad_accum: int, fail) -> int:
    """``--batch``, or ``--global-batch`` / (processes × ``--grad-accum``) when that is given
    (an error unless it divides)."""
    if global_batch is None:
        return batch
    from slimtune.train.distributed import world_size

    world = world_size()
    if global_batch < 1 or global_batch % (world * grad_accum):
        fail(f"--global-batch {global_batch} does not divide into {world} processes x "
             f"--grad-accum {grad_accum}")
    return global_batch // (world * grad_accum)


def _check_adapter_layers(model: str, config: TrainConfig, adapter, fail) -> None:
    """``adapter``'s per-layer checks (ranks, block sizes, densities) on the weightless model,
    wrapped as the task wraps it, before any weight loads."""
    from slimtune.adapt import check_layers
    from slimtune.models import model_skeleton
    from slimtune.train.classifier import SequenceClassifier

    skeleton = model_skeleton(model)
    if config.is_classification:  # the head trains in full; its class count does not matter here
        skeleton = SequenceClassifier(skeleton, 2)
    try:
        check_layers(skeleton, adapter)
    except ValueError as err:
        fail(str(err))


def _check_data_installed(config: TrainConfig, fail) -> None:
    from slimtune.data import load_classification, load_text

    try:
        (load_classification if config.is_classification else load_text)(config.data, "train")
        if config.calib_data is not None:
            load_text(config.calib_data, "train")
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))


def option_name(field: str) -> str:
    """The CLI flag of a training-config field (``grad_accum`` -> ``--grad-accum``)."""
    return "--hook" if field == "hooks" else "--" + field.replace("_", "-")


@command("adapt", help=ADAPT_HELP)
def adapt_command(
    model: str = typer.Option(..., "--model", "-m", help="Registered model name (smollm2-135m, "
                              "minilm-l6) or a local Hugging Face model directory."),
    method: str = typer.Option(..., "--method", help="Adapter method (see "
                               "slimtune.adapt.known_methods(): lora, pissa, ...) or 'full'."),
    r: int = typer.Option(16, "--r", "--rank", help="Adapter rank (under torchrun write "
                          "--rank, or put -- before slimtune: torchrun takes --r for its own "
                          "--rdzv-* options)."),
    alpha: float = typer.Option(32.0, "--alpha", help="Scale numerator: s = alpha / r."),
    targets: str = typer.Option("all-linear", "--targets", help="'all-linear', comma-separated "
                                "module names (q_proj,v_proj) or a regex on full names."),
    param: List[str] = typer.Option([], "--param", "-p", help="Method parameter key=value "
                                    "(repeatable), e.g. --param svd=exact."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="Causal-LM text: austen, ptb, finefoods-text "
                                       "or a UTF-8 text file (its last tenth of lines is the "
                                       "test split)."),
    task: Optional[str] = typer.Option(None, "--task", help="Classification task: finefoods "
                                       "(instead of --data)."),
    steps: int = typer.Option(_DEFAULT["steps"], "--steps", help="Optimiser steps."),
    batch: int = typer.Option(_DEFAULT["batch"], "--batch", help="Examples per micro-batch."),
    grad_accum: int = typer.Option(_DEFAULT["grad_accum"], "--grad-accum",
                                   help="Micro-batches per optimiser step."),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Examples per "
                                               "optimiser step over all processes (sets "
                                               "--batch; must divide by processes x "
                                               "--grad-accum)."),
    seqlen: Optional[int] = typer.Option(None, "--seqlen", show_default="256 LM, 128 finefoods",
                                         help="Window length / truncation length in tokens."),
    lr: float = typer.Option(_DEFAULT["lr"], "--lr", help="Peak learning rate."),
    warmup: int = typer.Option(_DEFAULT["warmup"], "--warmup", help="Linear-warmup steps."),
    max_grad_norm: float = typer.Option(_DEFAULT["max_grad_norm"], "--max-grad-norm",
                                        help="Clip the global gradient norm to this "
                                             "(0: no clipping)."),
    weight_decay: float = typer.Option(_DEFAULT["weight_decay"], "--weight-decay"),
    optimizer: str = typer.Option(_DEFAULT["optimizer"], "--optimizer", help="Optimiser: adamw, "
                                  "galore, fira, lion, sam, asam, gam, fsam, cautious, grams, "
                                  "mars (slimtune.train.optimizers)."),
    optim_param: List[str] = typer.Option([], "--optim-param", "-O", help="Optimiser key=value "
                                          "(repeatable), e.g. -O rank=128 -O "
                                          "update_proj_gap=200 for galore; --lr and "
                                          "--weight-decay have their own options."),
    hook: List[str] = typer.Option([], "--hook", help="Training hook (repeatable): trp, "
                                   "group_sparsity, temporary_forgetting, weight_compander "
                                   "(slimtune.train.hooks; full training)."),
    hook_param: List[str] = typer.Option([], "--hook-param", "-H", help="Hook key: "
                                         "NAME.key=value (repeatable), e.g. -H trp.every=20."),
    eval_every: int = typer.Option(_DEFAULT["eval_every"], "--eval-every",
                                   help="Evaluate every K steps (0: only at the end)."),
    eval_tokens: int = typer.Option(_DEFAULT["eval_tokens"], "--eval-tokens",
                                    help="LM: test-split tokens scored per evaluation."),
    eval_examples: int = typer.Option(_DEFAULT["eval_examples"], "--eval-examples",
                                      help="Classification: test reviews per evaluation."),
    save_every: int = typer.Option(_DEFAULT["save_every"], "--save-every",
                                   help="Checkpoint every K steps (0: never)."),
    seed: int = typer.Option(_DEFAULT["seed"], "--seed", help="Every seed of the run: data "
                             "order, the adapter's initialisation, the head, torch's RNG."),
    calib_n: int = typer.Option(_DEFAULT["calib_n"], "--calib-n",
                                help="Calibration windows (data-driven methods only)."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", show_default="the training "
                                             "data", help="Calibrate data-driven methods on this "
                                             "text's train split instead (austen, ptb or a text "
                                             "file): e.g. corda --param mode=kpm on the knowledge "
                                             "to keep."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist unless "
                                                      "--resume or --overwrite)."),
    resume: bool = typer.Option(False, "--resume", help="Continue OUT's run from its latest "
                                                        "checkpoint (or start it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in an existing OUT "
                                   "that slimtune wrote; its old result is replaced at the end."),
) -> None:
    """Validate everything, load the model, train, save."""
    check_model(model)
    from slimtune.data import CLASSIFICATION_DATASETS, TEXT_DATASETS
    from slimtune.models import is_causal_lm, model_architectures
    from slimtune.train import make_train_config

    params = parse_params(param, fail)
    optimizer_params = parse_params(optim_param, fail, "--optim-param", ("lr", "weight_decay"))
    hooks = [{"seed": seed, **h} for h in parse_hooks(hook, hook_param, fail)]
    batch = per_process_batch(batch, global_batch, grad_accum, fail)
    adapter = adapter_from_flags(method, params, r, alpha, targets, seed)
    if task is not None and data is not None:
        fail("--data (causal-LM text) and --task (classification) exclude each other")
    if task is None and data is None:
        fail(f"pass --data ({', '.join(TEXT_DATASETS)}) or --task "
             f"({', '.join(CLASSIFICATION_DATASETS)})")
    if task is not None and task not in CLASSIFICATION_DATASETS:
        fail(f"unknown task {task!r}: use one of {', '.join(CLASSIFICATION_DATASETS)}")
    if data is not None:  # text only: its own message, which lists no classification task
        check_data(data, "train")
        check_data(data, "test")
    if calib_data is not None:
        check_data(calib_data, "train", "--calib-data")
    try:
        config = make_train_config(
            method, option_name, data=task or data, steps=steps, batch=batch,
            grad_accum=grad_accum, seqlen=seqlen, lr=lr, warmup=warmup,
            max_grad_norm=max_grad_norm or None, weight_decay=weight_decay,
            optimizer=optimizer, optimizer_params=optimizer_params, hooks=hooks,
            eval_every=eval_every, eval_tokens=eval_tokens, eval_examples=eval_examples,
            save_every=save_every, seed=seed, calib_n=calib_n, calib_data=calib_data)
    except ValueError as err:
        fail(str(err))
    if config.is_classification == is_causal_lm(model_architectures(model)):
        kind = "an encoder (e.g. minilm-l6)" if config.is_classification else \
            "a causal language model (e.g. smollm2-135m)"
        fail(f"{config.data} needs {kind}; {model} is not one")
    if adapter is None:  # full fine-tuning: the optimiser's own checks, on the weightless model
        from slimtune.models import model_skeleton
        from slimtune.train.optimizers import build as build_optimizer

        try:
            build_optimizer(config.optimizer, model_skeleton(model), **config.optimizer_keys())
        except ValueError as err:
            fail(f"--optimizer: {err}")
    from slimtune.train.loop import check_calibration, check_resume

    try:
        check_calibration(config, adapter)
    except ValueError as err:
        fail(f"--calib-data: {err}")
    from slimtune.train.loop import check_compatibility

    try:
        check_compatibility(config, adapter)  # the optimiser's and the hooks' conflicts
    except ValueError as err:
        fail(str(err))
    if adapter is not None:
        _check_adapter_layers(model, config, adapter, fail)

    from slimtune.io.atomic import NotOurDirectoryError
    from slimtune.models import weights_bytes

    try:
        check_resume(out, config, adapter, resume, overwrite)
    except NotOurDirectoryError as err:
        fail(f"--out: {err}")
    except FileExistsError:
        fail(f"--out {out} already exists (pass --resume to continue its run, or --overwrite "
             "to start it afresh)")
    except ValueError as err:
        fail(f"--out: {err}")
    # full fine-tuning: the model, and a checkpoint with AdamW's two moments; adapters: a tenth
    size = weights_bytes(model)
    need = size * (4 if config.save_every else 1) if adapter is None else size // 10
    check_output(out, need, overwrite=True, resume=True)  # contents were checked just above
    _check_data_installed(config, fail)

    from slimtune.train import build_task, distributed, train

    base, tokenizer = load_or_fail(model)
    try:
        job = build_task(config, tokenizer)
        _, history = train(base, job, config, out, adapter=adapter, resume=resume,
                           overwrite=overwrite)
    except ValueError as err:
        fail(str(err))
    finally:
        distributed.stop()
    if not distributed.is_main():
        return
    final = history["final_eval"] or {}
    metric = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k in ("perplexity", "accuracy"))
    what = "in full" if adapter is None else f"with {adapter.method} (r={adapter.r})"
    stdout.print(f"trained {model} {what} on {config.data}: "
                 f"{history['trainable_parameters']:,} trainable parameters, {config.steps} steps, "
                 f"{history['seconds_per_step']:.2f} s/step, final loss "
                 f"{history['steps'][-1]['loss']:.4f}, {metric}, peak RSS "
                 f"{history['peak_rss_mb']:.0f} MB -> {out}", highlight=False, soft_wrap=True)
