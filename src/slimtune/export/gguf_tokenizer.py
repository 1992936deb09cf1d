"""The GGUF tokenizer fields of a Hugging Face byte-level BPE tokenizer (GPT-2 style, as SmolLM2
and most Llama-architecture models after Llama 2 use), as llama.cpp's ``convert_hf_to_gguf.py``
writes them: ``tokenizer.ggml.model = "gpt2"``, the token strings in id order, their types
(special added tokens are control tokens, other added tokens user-defined, the rest normal), the
merges as ``"left right"`` strings, the special token ids and the chat template.

The pre-tokenizer name tells llama.cpp which split regex to use; it is not in tokenizer.json, so
it comes from a small table of known vocabularies (``smollm`` for SmolLM/SmolLM2) and is an error
otherwise, rather than a silent wrong tokenisation.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# llama.cpp's pre-tokenizer names of vocabularies checked here, recognised by their first token
# strings and their size
KNOWN_PRE = {"smollm": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", 49152)}

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # gguf.TokenType values


@dataclass
class GGUFTokenizer:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    chat_template: str | None = None


def _pre_name(tokens: list[str]) -> str:
    for name, (*first, size) in KNOWN_PRE.items():
        if len(tokens) == size and tokens[:len(first)] == list(first):
            return name
    digest = hashlib.sha256("\n".join(tokens[:64]).encode()).hexdigest()[:12]
    raise ValueError(f"GGUF: unknown byte-level BPE vocabulary ({len(tokens)} tokens, first "
                     f"{tokens[:3]}, digest {digest}): llama.cpp needs its pre-tokenizer name, "
                     f"known here: {sorted(KNOWN_PRE)}")


def gguf_tokenizer(tokenizer, config) -> GGUFTokenizer:
    """The GGUF tokenizer of the ``tokenizer.json`` in the directory ``tokenizer`` (or of a loaded
    Hugging Face tokenizer, saved to a temporary directory to get that file); special ids from
    the model's ``config`` (bos / eos / unk / pad token ids)."""
    if hasattr(tokenizer, "save_pretrained"):
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            return gguf_tokenizer(folder, config)
    path = Path(tokenizer) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"GGUF: {path} not found (the exported model needs its tokenizer.json)")
    data = json.loads(path.read_text())
    model = data.get("model", {})
    pre = data.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel" or any(
        p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", []))
    if model.get("type") != "BPE" or not byte_level:
        raise ValueError(f"GGUF: only byte-level BPE tokenizers are written (got model "
                         f"{model.get('type')!r}, pre-tokenizer {pre.get('type')!r})")
    vocab = dict(model["vocab"])
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    size = max(max(vocab.values()) + 1, getattr(config, "vocab_size", 0) or 0)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [USER_DEFINED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = NORMAL
    for i, a in added.items():
        types[i] = CONTROL if a.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {k: int(v) for k in ("bos", "eos", "unk", "pad")
               if isinstance(v := getattr(config, f"{k}_token_id", None), int)}
    template = None
    tc = Path(tokenizer) / "chat_template.jinja"
    if tc.is_file():
        template = tc.read_text()
    else:
        cfg = Path(tokenizer) / "tokenizer_config.json"
        if cfg.is_file():
            template = json.loads(cfg.read_text()).get("chat_template")
    return GGUFTokenizer(tokens, types, merges, _pre_name(tokens), special, False, template)


def add_tokenizer(writer, tok: GGUFTokenizer) -> None:
    """Write ``tok`` through a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.types)
    writer.add_token_merges(tok.merges)
    add = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
           "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for k, i in tok.special.items():
        add[k](i)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_space_prefix(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
