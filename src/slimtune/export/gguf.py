"""Export a Llama-architecture model as a GGUF file for llama.cpp (and Ollama, LM Studio, and
transformers' GGUF loader), carrying calibrated integers exactly.

llama.cpp's own quantiser is round-to-nearest without calibration; here a layer that GPTQ (or any
slimtune quantiser) left on a grid that a GGML block type holds keeps its integers: symmetric
2-4-bit groups of a multiple of 32 (or per channel) are Q4_0 with the scales rounded to fp16,
asymmetric ones Q4_1, up to 7-bit Q8_0 (:mod:`slimtune.weights.ggml_blocks`).

``gguf_type``:

- ``auto``: every quantised layer in its exact carrier; layers that are not quantised in F16.
- ``q4_0`` / ``q4_1`` / ``q8_0``: that type for every linear; a quantised layer it cannot carry
  exactly is an error unless ``requantize`` (then its weight is dequantised and re-quantised by
  gguf's round-to-nearest, with a warning); float layers are quantised by round-to-nearest, as
  llama.cpp would.
- ``f16`` / ``f32``: every layer dense, its low-rank, sparse and mask parts folded in.

A low-rank part beside a quantised base (eora, lowrank_first) has no place in GGUF: with a
quantised type the export refuses (folding it in means re-quantising, which throws away what the
calibration bought); ``requantize`` folds and re-quantises with round-to-nearest instead. The
``--embedding-type`` (the token embedding, tied to the output head in SmolLM2) is f32, f16, q8_0
or q4_0; norms are F32. q_proj / k_proj rows are permuted to llama.cpp's rotary layout.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from slimtune.export.deploy_layers import DeployError, DeployLayer, deploy_layers
from slimtune.export.gguf_tokenizer import add_tokenizer, gguf_tokenizer
from slimtune.io.atomic import atomic_file
from slimtune.weights.ggml_blocks import blocks, carrier_error, exact_carrier, q4_1_offset_error

GGUF_TYPES = ("auto", "q4_0", "q4_1", "q8_0", "f16", "f32")
EMBEDDING_TYPES = ("f32", "f16", "q8_0", "q4_0")
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
NORM_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}
# bytes per weight of each type (a block of 32 weights: fp16 scale (+ fp16 offset) + integers);
# auto writes each layer in its exact carrier or F16, so F16 bounds it
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32,
                    "auto": 2.0}


def check_gguf_args(gguf_type: str, embedding_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if embedding_type not in EMBEDDING_TYPES:
        raise ValueError(f"unknown embedding type {embedding_type!r}; choose one of "
                         f"{', '.join(EMBEDDING_TYPES)}")


def estimate_bytes(skeleton: nn.Module, gguf_type: str, embedding_type: str) -> int:
    """About how large the GGUF of ``skeleton`` (a model on any device, e.g. ``meta``) will be:
    the token embedding (and an untied output head) in ``embedding_type``, every other weight in
    ``gguf_type`` (an upper bound for ``auto``), plus 2 MB for the tokenizer and metadata."""
    embedding = skeleton.get_input_embeddings().weight
    head = skeleton.get_output_embeddings()
    heads = [embedding] + ([head.weight] if head is not None and head.weight is not embedding
                           else [])
    ids = {id(w) for w in heads}
    rest = sum(p.numel() for p in skeleton.parameters() if id(p) not in ids)
    return int(sum(w.numel() for w in heads) * BYTES_PER_WEIGHT[embedding_type]
               + rest * BYTES_PER_WEIGHT[gguf_type]) + 2 * 2 ** 20


def check_llama(config) -> None:
    """A clear error unless ``config`` is a Llama-architecture causal LM GGUF can describe."""
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"GGUF export writes the llama architecture; this model is "
                         f"{getattr(config, 'model_type', None)!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not written")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("GGUF export: llama.cpp's llama graph has no linear biases")


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def permute_rows(x: Tensor, heads: int) -> Tensor:
    """llama.cpp's rotary row order for q_proj (heads = n_head) and k_proj (n_kv_head): within
    each head the two halves are interleaved."""
    rows = x.shape[0]
    return x.reshape(heads, 2, rows // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _gguf_quant(array: np.ndarray, kind: str):
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def layer_plan(layers: dict[str, DeployLayer], gguf_type: str, requantize: bool,
               in_features: dict[str, int]) -> dict[str, str]:
    """``name -> "exact:<type>" | "rtn:<type>" | "f16" | "f32"`` for every linear, or a
    DeployError naming every layer ``gguf_type`` cannot hold without ``requantize``."""
    plan, problems = {}, {}
    for name, d in layers.items():
        n = in_features[name]
        if d.quant is None:
            plan[name] = "f16" if gguf_type == "auto" else (
                gguf_type if gguf_type in ("f16", "f32") else f"rtn:{gguf_type}")
            continue
        want = exact_carrier(d.quant.spec, n) if gguf_type == "auto" else gguf_type
        why = ("no GGML block type carries it: " + str(carrier_error(d.quant.spec, n, "q8_0"))
               if want is None else carrier_error(d.quant.spec, n, want))
        if d.lowrank is not None:
            why = (f"its rank-{d.lowrank.rank} low-rank part has no place beside a quantised "
                   "GGUF weight (export f16 to fold it, or compressed-tensors + adapter)")
        if why is None:
            plan[name] = f"exact:{want}"
        elif requantize:
            plan[name] = f"rtn:{'q4_0' if want is None else want}"
        else:
            problems[name] = why + " (requantize re-quantises it by round-to-nearest)"
    if problems:
        raise DeployError(f"GGUF {gguf_type}", problems)
    return plan


def _weight_tensor(d: DeployLayer, how: str) -> tuple[np.ndarray, object]:
    """(array, raw dtype or None) of one linear's weight under ``how``."""
    import gguf

    kind = how.partition(":")[2] or how
    if how.startswith("exact:"):
        q = d.quant
        data = blocks(kind, q.q, q.scale, q.zero, q.spec).cpu().numpy()
        return data, getattr(gguf.GGMLQuantizationType, kind.upper())
    dense = d.dense if d.dense is not None else d.quant.dequantized()
    if d.quant is not None and d.lowrank is not None:
        lr = d.lowrank
        dense = dense + lr.scaling * (lr.B.float() @ lr.A.float())
    array = dense.detach().float().cpu().numpy()
    if kind == "f16":
        return array.astype(np.float16), None
    if kind == "f32":
        return array, None
    return _gguf_quant(array, kind)


def _permuted(d: DeployLayer, heads: int) -> DeployLayer:
    q = d.quant
    if q is not None:
        q = replace(q, q=permute_rows(q.q, heads), scale=permute_rows(q.scale, heads),
                    zero=permute_rows(q.zero, heads))
    lr = d.lowrank
    if lr is not None:
        lr = replace(lr, B=permute_rows(lr.B, heads))
    dense = None if d.dense is None else permute_rows(d.dense, heads)
    return DeployLayer(q, dense, lr, d.bias)


def _metadata(writer, config, file_type: int) -> None:
    import gguf

    writer.add_name(str(getattr(config, "_name_or_path", "") or "slimtune export"))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


@torch.no_grad()
def write_gguf(model: nn.Module, tokenizer, out: str | os.PathLike,
               gguf_type: str = "auto", embedding_type: str = "q8_0", requantize: bool = False,
               overwrite: bool = False) -> dict:
    """Write ``model`` (a LlamaForCausalLM, compressed or not) and ``tokenizer`` (a loaded Hugging
    Face tokenizer or the directory of its ``tokenizer.json``) to the ``.gguf`` file ``out``
    atomically; returns what each layer became and the file size. Everything is checked before
    the file is opened. ``q4_1_offset_error`` (None without Q4_1 layers): the largest change
    Q4_1's float16 scale and offset make to a weight, relative to its layer's largest weight."""
    import gguf

    check_gguf_args(gguf_type, embedding_type)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    config = model.config
    check_llama(config)
    tok = gguf_tokenizer(tokenizer, config)
    fold = gguf_type in ("f16", "f32")
    layers = deploy_layers(model, f"GGUF {gguf_type}", fold=fold)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            layers[name] = DeployLayer(None, m.weight.detach(), None, None)
    in_features = {n: model.get_submodule(n).in_features for n in layers}
    plan = layer_plan(layers, gguf_type, requantize, in_features)
    rtn = sorted(n for n, how in plan.items() if how.startswith("rtn:") and
                 layers[n].quant is not None)
    if rtn:
        warnings.warn(f"GGUF {gguf_type}: {len(rtn)} quantised layer(s) re-quantised by "
                      f"round-to-nearest (e.g. {rtn[0]}); measure the perplexity change")
    q4_1 = [layers[n].quant for n, how in plan.items() if how == "exact:q4_1"]
    offset_error = max((q4_1_offset_error(q.q, q.scale, q.zero) for q in q4_1), default=None)
    tied = getattr(config, "tie_word_embeddings", False)
    kinds = Counter((how.partition(":")[2] or how) for how in plan.values())
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        _metadata(writer, config, FILE_TYPES[kinds.most_common(1)[0][0]])
        add_tokenizer(writer, tok)
        emb = model.get_input_embeddings().weight.detach().float().cpu().numpy()
        if embedding_type in ("f32", "f16"):
            writer.add_tensor("token_embd.weight", emb.astype(np.float16 if embedding_type ==
                                                              "f16" else np.float32))
        else:
            data, qtype = _gguf_quant(emb, embedding_type)
            writer.add_tensor("token_embd.weight", data, raw_dtype=qtype)
        heads = {"self_attn.q_proj": config.num_attention_heads,
                 "self_attn.k_proj": config.num_key_value_heads}
        for i, block in enumerate(model.model.layers):
            prefix = f"model.layers.{i}."
            for hf, short in NORM_NAMES.items():
                writer.add_tensor(f"blk.{i}.{short}.weight",
                                  getattr(block, hf).weight.detach().float().cpu().numpy())
            for hf, short in LAYER_NAMES.items():
                d = layers[prefix + hf]
                if hf in heads:
                    d = _permuted(d, heads[hf])
                array, raw = _weight_tensor(d, plan[prefix + hf])
                writer.add_tensor(f"blk.{i}.{short}.weight", array, raw_dtype=raw)
        writer.add_tensor("output_norm.weight", model.model.norm.weight.detach().float().cpu()
                          .numpy())
        if not tied:
            head = DeployLayer(None, model.lm_head.weight.detach(), None, None)
            array, raw = _weight_tensor(head, "f16" if embedding_type == "f16" else
                                        (embedding_type if embedding_type == "f32"
                                         else f"rtn:{embedding_type}"))
            writer.add_tensor("output.weight", array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"path": str(out), "bytes": out.stat().st_size, "layers": dict(Counter(plan.values())),
            "requantized": rtn, "embedding_type": embedding_type,
            "q4_1_offset_error": offset_error}
