"""``slimtune pretrain``: train a small Llama from random initialisation on a text data set.

Like the other commands it only parses, validates and prints; everything is checked before the
model is built (architecture, method and optimiser with their keys, token budget against the
global batch and the world size under torchrun, data, output directory). The work is
:func:`slimtune.train.train`, the loop ``adapt`` uses, on a model from
:mod:`slimtune.train.scratch`.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from slimtune.cli.adapt import (adapter_from_flags, option_name, parse_hooks, parse_params,
                                per_process_batch)
from slimtune.cli.app import check_data, check_output, command, fail, stdout

PRETRAIN_HELP = (
    "Pretrain a small Llama from scratch (SmolLM2's tokenizer) and save it.\n\n"
    "The model (--hidden, --layers, --heads, ...) is drawn from --seed; training reads random "
    "windows of --seqlen tokens of --data's train split for --tokens tokens (steps = tokens / "
    "(global batch x seqlen), global batch = --batch x --grad-accum x processes), with "
    "--optimizer and --method full (every weight trains) or a factored method (sltrain, sst, "
    "lora on the frozen random base, ...) on the linears, the embeddings and norms training in "
    "full beside it. Perplexity on the test split (and PTB's valid "
    "split) at --eval-every and at the end. --save-every K keeps a checkpoint; --resume "
    "continues from it. OUT ends up a Hugging Face model directory (a factored method is "
    "merged into it) plus history.json. Flags may come from --config FILE (YAML: flag names "
    "as keys; flags given on the command line win). Under torchrun --nproc-per-node N every "
    "process trains on its --batch of each step (DDP).\n\n"
    "Example: slimtune pretrain --hidden 384 --layers 6 --heads 6 --data ptb --tokens 2000000 "
    "--optimizer galore -O rank=96 --out out/llama-galore")

LIST_KEYS = {"param": "params", "optim_param": "optim_params"}  # mappings in the file


def _from_config_file(ctx: typer.Context, path: Path, values: dict) -> dict:
    """``values`` with the config file's entries for every option not given on the command line."""
    import click
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        fail(f"--config {path}: {err}")
    if not isinstance(loaded, dict):
        fail(f"--config {path}: expected a mapping of option names to values")
    known = set(values) - {"config"}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        name = {v: k for k, v in LIST_KEYS.items()}.get(name, name)
        if name not in known:
            fail(f"--config {path}: unknown option {key!r}; known: "
                 f"{', '.join(sorted(k.replace('_', '-') for k in known))}")
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            continue
        if name in LIST_KEYS:
            if not isinstance(value, dict):
                fail(f"--config {path}: {key} must be a mapping of keys to values")
            value = [f"{k}={v}" for k, v in value.items()]
        elif isinstance(values[name], list) and not isinstance(value, list):
            value = [value]  # a repeatable option given once
        values[name] = value
    return values


@command("pretrain", help=PRETRAIN_HELP)
def pretrain_command(
    ctx: typer.Context,
    arch: str = typer.Option("llama", "--arch", help="Architecture (llama)."),
    hidden: int = typer.Option(384, "--hidden", help="Model width."),
    layers: int = typer.Option(6, "--layers", help="Transformer blocks."),
    heads: int = typer.Option(6, "--heads", help="Attention heads."),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="Key/value heads "
                                           "(default: --heads)."),
    intermediate: Optional[int] = typer.Option(None, "--intermediate", help="MLP width "
                                               "(default 8/3 x hidden, multiple of 64)."),
    data: str = typer.Option("ptb", "--data", "-d", help="Text: ptb, austen, finefoods-text or "
                             "a UTF-8 text file."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Training-token budget "
                                         "(required, here or in --config)."),
    seqlen: int = typer.Option(256, "--seqlen", help="Tokens per window."),
    batch: int = typer.Option(8, "--batch", help="Windows per micro-batch, per process."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per step."),
    global_batch: Optional[int] = typer.Option(None, "--global-batch", help="Windows per step "
                                               "over all processes (sets --batch; must divide "
                                               "by processes x --grad-accum)."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
    warmup: Optional[int] = typer.Option(None, "--warmup", show_default="10% of the steps",
                                         help="Linear-warmup steps."),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="Final lr / peak lr."),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="0: no clipping."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="Optimiser (see adapt --help)."),
    optim_param: List[str] = typer.Option([], "--optim-param", "-O", help="Optimiser "
                                          "key=value (repeatable)."),
    hook: List[str] = typer.Option([], "--hook", help="Training hook (repeatable), e.g. "
                                   "temporary_forgetting (see adapt --help)."),
    hook_param: List[str] = typer.Option([], "--hook-param", "-H", help="Hook key: "
                                         "NAME.key=value (repeatable)."),
    method: str = typer.Option("full", "--method", help="full, or a factored method "
                               "(sltrain, sst, lost, lora, ...)."),
    r: int = typer.Option(16, "--r", "--rank", help="Rank of a factored method (under "
                          "torchrun write --rank, or put -- before slimtune: torchrun takes "
                          "--r for its own --rdzv-* options)."),
    alpha: float = typer.Option(32.0, "--alpha", help="Its scale numerator (s = alpha / r)."),
    targets: str = typer.Option("all-linear", "--targets", help="Linears it factors."),
    param: List[str] = typer.Option([], "--param", "-p", help="Method key=value (repeatable)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Evaluate every K steps (0: end)."),
    eval_tokens: int = typer.Option(131072, "--eval-tokens", help="Tokens scored per split."),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every K steps."),
    seed: int = typer.Option(0, "--seed", help="Seeds the weights, data order and method."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of these options."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory "
                                       "(required, here or in --config)."),
    resume: bool = typer.Option(False, "--resume", help="Continue OUT's run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in OUT."),
) -> None:
    """Validate everything, build the model, train, save."""
    values = dict(locals())
    values.pop("ctx")
    if config is not None:
        values = _from_config_file(ctx, config, values)
    _pretrain(**values)


def _pretrain(arch, hidden, layers, heads, kv_heads, intermediate, data, tokens, seqlen, batch,
              grad_accum, global_batch, lr, warmup, min_lr_ratio, weight_decay, max_grad_norm,
              optimizer, optim_param, hook, hook_param, method, r, alpha, targets, param,
              eval_every, eval_tokens, save_every, seed, config, out, resume, overwrite) -> None:
    from slimtune.data import TEXT_DATASETS
    from slimtune.registry import validate
    from slimtune.train import distributed, make_train_config
    from slimtune.train.scratch import ArchConfig

    for name, value in (("--tokens", tokens), ("--out", out)):
        if value is None:
            fail(f"pass {name} (or set it in --config)")
    out = Path(out)
    try:
        shape = validate(ArchConfig, dict(arch=arch, hidden=hidden, layers=layers, heads=heads,
                                          kv_heads=kv_heads, intermediate=intermediate,
                                          max_positions=max(2048, seqlen), seed=seed),
                         "model", key=option_name)
    except ValueError as err:
        fail(str(err))
    params = parse_params(param, fail)
    adapter = adapter_from_flags(method, params, r, alpha, targets, seed)
    hooks = [{"seed": seed, **h} for h in parse_hooks(hook, hook_param, fail)]
    world = distributed.world_size()
    batch = per_process_batch(batch, global_batch, grad_accum, fail)
    per_step = batch * grad_accum * world * seqlen
    if tokens < per_step:
        fail(f"--tokens {tokens} is less than one step ({batch} x {grad_accum} x {world} "
             f"processes x {seqlen} tokens = {per_step})")
    check_data(data, "train")
    check_data(data, "test")
    try:
        train_config = make_train_config(
            method, option_name, data=data, steps=tokens // per_step, batch=batch,
            grad_accum=grad_accum, seqlen=seqlen, lr=lr, min_lr_ratio=min_lr_ratio,
            warmup=(tokens // per_step) // 10 if warmup is None else warmup,
            max_grad_norm=max_grad_norm or None, weight_decay=weight_decay,
            optimizer=optimizer, optimizer_params=parse_params(
                optim_param, fail, "--optim-param", ("lr", "weight_decay")), hooks=hooks,
            eval_every=eval_every, eval_tokens=eval_tokens, save_every=save_every, seed=seed)
    except ValueError as err:
        fail(str(err))
    from slimtune.train.loop import check_compatibility, check_resume

    meta = {"world_size": world, "arch": shape.model_dump()}
    try:
        check_compatibility(train_config, adapter)
        check_resume(out, train_config, adapter, resume, overwrite, meta)
    except FileExistsError:
        fail(f"--out {out} already exists (pass --resume to continue its run, or --overwrite "
             "to start it afresh)")
    except ValueError as err:
        fail(str(err))
    from slimtune.train import CausalLMTask, train
    from slimtune.train.scratch import build_model, parameter_count, skeleton, tokenizer

    tok = tokenizer()
    # the saved model; with checkpoints, also weights + AdamW's two moments while training
    size = parameter_count(shape, len(tok)) * 4
    check_output(out, size * (4 if save_every else 1), overwrite=True, resume=True)
    if adapter is None:  # the optimiser's own checks (a GaLore rank too large), weightless
        from slimtune.train.optimizers import build as build_optimizer

        try:
            build_optimizer(optimizer, skeleton(shape, tok), **train_config.optimizer_keys())
        except ValueError as err:
            fail(f"--optimizer: {err}")
    else:  # the factored method's rank against every targeted layer, weightless
        from slimtune.targets import match_targets

        bare = skeleton(shape, tok)
        names = match_targets(bare, adapter.targets)
        if not names:
            fail(f"--targets {targets!r} match no linear layer of the model")
        small = min(min(bare.get_submodule(n).weight.shape) for n in names)
        if adapter.r > small:
            fail(f"--r {adapter.r} exceeds the smallest targeted layer's min(out, in) = {small}")
    model = build_model(shape, tok)
    also = tuple(s for s in TEXT_DATASETS.get(data, ()) if s not in ("train", "test"))
    task = CausalLMTask(tok, data, seqlen, eval_tokens, seed=seed, eval_batch=batch,
                        also_eval=also)
    try:
        _, history = train(model, task, train_config, out, adapter=adapter, resume=resume,
                           overwrite=overwrite, meta={"arch": shape.model_dump()},
                           merge_adapter=True, train_rest=True)
    finally:
        distributed.stop()
    if not distributed.is_main():
        return
    final = history["final_eval"] or {}
    scores = ", ".join(f"{k} {v:.4g}" for k, v in final.items() if k.endswith("perplexity"))
    stdout.print(f"pretrained llama {hidden}x{layers} ({history['parameters']:,} parameters, "
                 f"{history['trainable_parameters']:,} trainable) with {method} and {optimizer} "
                 f"on {data}: {train_config.steps} steps of {per_step} tokens, "
                 f"{history['seconds_per_step']:.2f} s/step, final loss "
                 f"{history['steps'][-1]['loss']:.4f}, {scores}, peak RSS "
                 f"{history['peak_rss_mb']:.0f} MB -> {out}", highlight=False, soft_wrap=True)
