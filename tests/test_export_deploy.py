"""Deployable exports (issue #13): compressed-tensors and GGUF, proven with the real readers.

Each reader runs in its own Python process that never imports slimtune (transformers +
compressed-tensors / gguf / peft only) and compares its logits with the ones slimtune computed
for the same model on the same tokens.
"""
import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slimtune.calib import calibration_windows, run_pipeline
from slimtune.compress import build_steps, load_recipe
from slimtune.export.compressed_tensors import write_compressed_tensors
from slimtune.export.deploy_layers import DeployError
from slimtune.export.gguf import write_gguf
from slimtune.models import load_model, resolve_model_dir, smollm2_gguf_path
from slimtune.weights.packing import pack_int32, unpack_int32

PROMPT = "The quantised model loads in the tools people deploy with, and gives the same logits."

READ_CT = """
import sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
out, how = sys.argv[1], sys.argv[2]
kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if how != "packed" else {}
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw).eval()
if how == "peft":
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, out + "/adapter").eval()
ids = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[4])
assert "slimtune" not in sys.modules
"""

READ_GGUF = """
import os, sys, torch
from transformers import AutoModelForCausalLM
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                             dtype=torch.float32).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
assert "slimtune" not in sys.modules
"""


def reader_logits(script: str, args: list, ids, tmp_path):
    ids_file, out_file = tmp_path / "ids.pt", tmp_path / "logits.pt"
    torch.save(ids, ids_file)
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args),
                          str(ids_file), str(out_file)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out_file)


def compressed(smollm2, recipe, windows=2):
    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    steps = build_steps(load_recipe(recipe))
    run_pipeline(model, calibration_windows(tok, "ptb", "train", n=windows, seqlen=64, seed=0),
                 steps, progress=False)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    return model, tok, ids, logits


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- pure layout checks against the peers' own packers / decoders --------------------------------

@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("dim", [0, 1])
def test_int32_packing_equals_compressed_tensors(bits, dim):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    q = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (12, 100), generator=g)
    theirs = pack_to_int32(q.to(torch.int8), bits, packed_dim=dim)
    u = (q + 2 ** (bits - 1)).to(torch.int32)
    ours = pack_int32(u, bits) if dim == 1 else pack_int32(u.T.contiguous(), bits).T
    assert torch.equal(ours, theirs)
    rows = u if dim == 1 else u.T  # the rows that were packed
    words = ours if dim == 1 else ours.T.contiguous()
    assert torch.equal(unpack_int32(words, bits, rows.shape[1]), rows)


# -- compressed-tensors ------------------------------------------------------------------------

QUANTISERS = ["rtn", pytest.param("gptq", marks=pytest.mark.slow)]


@pytest.mark.parametrize("method", QUANTISERS)
def test_symmetric_4bit_loads_in_transformers_with_the_same_logits(method, smollm2, tmp_path):
    model, tok, ids, logits = compressed(smollm2, f"- {{method: {method}, bits: 4, "
                                                  "group_size: 32}")
    info = write_compressed_tensors(model, tok, tmp_path / "ct")
    assert info["quantised_layers"] == 210 and info["schemes"] == 1
    assert info["bytes"] < 0.5 * 538e6  # float32 SmolLM2 is 538 MB
    assert relative(reader_logits(READ_CT, [tmp_path / "ct", "packed"], ids, tmp_path),
                    logits) <= 1e-5
    reloaded, _ = load_model(tmp_path / "ct")  # slimtune's own reader keeps them packed
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_a_float16_embedding_halves_it_and_transformers_reads_it(smollm2, tmp_path):
    model, tok, ids, _ = compressed(smollm2, "- {method: rtn, bits: 4, group_size: 32}")
    full = write_compressed_tensors(model, tok, tmp_path / "f32")
    half = write_compressed_tensors(model, tok, tmp_path / "f16", embedding_type="f16")
    embedding = model.get_input_embeddings().weight
    assert full["bytes"] - half["bytes"] == pytest.approx(2 * embedding.numel(), rel=1e-3)
    with torch.no_grad():  # ours with the embedding rounded to float16 (tied: the head too)
        embedding.copy_(embedding.half().float())
        want = model(ids).logits
    assert relative(reader_logits(READ_CT, [tmp_path / "f16", "packed"], ids, tmp_path),
                    want) <= 1e-5
    reloaded, _ = load_model(tmp_path / "f16")
    with torch.no_grad():
        assert relative(reloaded(ids).logits, want) <= 1e-5
    with pytest.raises(ValueError, match="unknown embedding type 'q8_0'"):
        write_compressed_tensors(model, tok, tmp_path / "q8", embedding_type="q8_0")


def test_asymmetric_and_mixed_schemes_load_the_documented_way(smollm2, tmp_path):
    recipe = """
    - {method: rtn, bits: 3, group_size: 64, sym: false, targets: 'model\\.layers\\.[0-9]\\..*'}
    """
    model, tok, ids, logits = compressed(smollm2, recipe)
    write_compressed_tensors(model, tok, tmp_path / "asym")
    cfg = json.loads((tmp_path / "asym" / "config.json").read_text())["quantization_config"]
    assert cfg["config_groups"]["group_0"]["weights"]["symmetric"] is False
    assert len(cfg["ignore"]) == 1 + 20 * 7  # lm_head and the float layers of blocks 10-29
    assert relative(reader_logits(READ_CT, [tmp_path / "asym", "dequantize"], ids, tmp_path),
                    logits) <= 1e-5
    mixed = """
    - {method: rtn, bits: 4, group_size: 32, targets: 'model\\.layers\\.\\d+\\.self_attn\\..*'}
    - {method: rtn, bits: 8, targets: 'model\\.layers\\.\\d+\\.mlp\\..*'}
    """
    model, tok, ids, logits = compressed(smollm2, mixed)
    info = write_compressed_tensors(model, tok, tmp_path / "mixed")
    assert info["schemes"] == 2
    assert relative(reader_logits(READ_CT, [tmp_path / "mixed", "packed"], ids, tmp_path),
                    logits) <= 1e-5


def test_low_rank_compensation_becomes_a_peft_adapter_on_the_quantised_base(smollm2, tmp_path):
    recipe = """
    - {method: gptq, bits: 3, group_size: 64, targets: 'model\\.layers\\.[01]\\..*'}
    - {method: eora, rank: 8, targets: 'model\\.layers\\.[01]\\..*'}
    """
    model, tok, ids, logits = compressed(smollm2, recipe, windows=4)
    info = write_compressed_tensors(model, tok, tmp_path / "ct")
    assert info["adapter_layers"] == 14
    peft_logits = reader_logits(READ_CT, [tmp_path / "ct", "peft"], ids, tmp_path)
    assert relative(peft_logits, logits) <= 1e-5
    base_only = reader_logits(READ_CT, [tmp_path / "ct", "dequantize"], ids, tmp_path)
    assert relative(base_only, logits) > 1e-4  # the adapter is what closes the gap
    reloaded, _ = load_model(tmp_path / "ct")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_a_sparse_part_beside_a_quantised_base_is_refused_naming_the_layers(smollm2, tmp_path):
    recipe = """
    - {method: outliers, fraction: 0.005, targets: 'model\\.layers\\.0\\.mlp\\..*'}
    - {method: rtn, bits: 4, group_size: 32, targets: 'model\\.layers\\.0\\.mlp\\..*'}
    """
    model, tok, _, _ = compressed(smollm2, recipe)
    with pytest.raises(DeployError, match=r"3 layer\(s\).*model\.layers\.0\.mlp\.down_proj.*"
                                          r"sparse part"):
        write_compressed_tensors(model, tok, tmp_path / "ct")
    with pytest.raises(DeployError, match="sparse part"):
        write_gguf(model, resolve_model_dir("smollm2-135m"), tmp_path / "m.gguf")
    assert not any(tmp_path.iterdir())


# -- GGUF --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", QUANTISERS)
def test_4bit_in_q4_0_is_read_bit_exactly_by_transformers_gguf_loader(method, smollm2, tmp_path):
    model, _, ids, logits = compressed(
        smollm2, f"- {{method: {method}, bits: 4, group_size: 32, fp16_scales: true}}")
    info = write_gguf(model, resolve_model_dir("smollm2-135m"), tmp_path / "m.gguf")
    assert info["layers"] == {"exact:q4_0": 210}
    theirs = reader_logits(READ_GGUF, [tmp_path / "m.gguf"], ids, tmp_path)
    assert torch.equal(theirs, logits)


PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"
LLAMA_PY, LLAMA_PPL = PEERS / ".venv-llamacpp" / "bin" / "python", PEERS / "llamacpp_ppl.py"


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_PY.exists(), reason="llama.cpp venv missing: run "
                    "bash benchmarks/peers/build_llamacpp.sh (builds llama-cpp-python once)")
def test_llama_cpp_scores_our_q4_0_gguf_within_1_percent_of_our_perplexity(smollm2, tmp_path):
    """llama.cpp itself (llama-cpp-python, in a venv with neither torch nor slimtune) loads our
    Q4_0 file and its perplexity on PTB test is ours within 1% (its kernels quantise the
    activations of Q4_0 products to 8 bits, so not bit-exact)."""
    import numpy as np

    from slimtune.data import load_text
    from slimtune.evaluate import perplexity, tokenize_text

    model, tok, _, _ = compressed(smollm2, "- {method: rtn, bits: 4, group_size: 32, "
                                           "fp16_scales: true}")
    info = write_gguf(model, resolve_model_dir("smollm2-135m"), tmp_path / "m.gguf")
    assert info["layers"] == {"exact:q4_0": 210}
    ids = tokenize_text(tok, load_text("ptb", "test"))[:1024]
    ours = perplexity(model, ids, seqlen=512, progress=False)["perplexity"]
    np.save(tmp_path / "ids.npy", ids.numpy())
    run = subprocess.run([str(LLAMA_PY), str(LLAMA_PPL), str(tmp_path / "m.gguf"),
                          str(tmp_path / "ids.npy"), "--seqlen", "512", "--gen", "2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    assert theirs["reader"] == "llama.cpp" and theirs["tokens"] == 2 * 511
    assert abs(theirs["perplexity"] / ours - 1) < 0.01, (theirs["perplexity"], ours)


def test_gguf_metadata_and_tokenizer_equal_the_shipped_smollm2_gguf(smollm2, tmp_path):
    import gguf

    model, _, _, _ = compressed(smollm2, "- {method: rtn, bits: 8, group_size: 32, "
                                         "targets: 'model\\.layers\\.0\\..*'}")
    info = write_gguf(model, resolve_model_dir("smollm2-135m"), tmp_path / "m.gguf",
                      embedding_type="f16")
    assert info["layers"] == {"exact:q8_0": 7, "f16": 203}
    ours, theirs = gguf.GGUFReader(tmp_path / "m.gguf"), gguf.GGUFReader(smollm2_gguf_path())
    keys = [k for k in theirs.fields if k.startswith(("llama.", "tokenizer."))]
    assert len(keys) > 20
    for key in keys:
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert "output.weight" not in {t.name for t in ours.tensors}  # tied embeddings
    types = {t.name: t.tensor_type.name for t in ours.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.1.attn_q.weight"] == "F16"
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"


def test_what_a_gguf_type_cannot_carry_is_an_error_unless_requantized(smollm2, tmp_path):
    model, _, ids, logits = compressed(smollm2, """
    - {method: gptq, bits: 3, group_size: 64, sym: false, targets: 'model\\.layers\\.0\\..*'}
    - {method: eora, rank: 4, targets: 'model\\.layers\\.0\\.self_attn\\.q_proj'}
    """)
    tok_dir = resolve_model_dir("smollm2-135m")
    with pytest.raises(DeployError, match=r"GGUF q4_0 cannot hold 7 layer\(s\).*no zero point"):
        write_gguf(model, tok_dir, tmp_path / "a.gguf", "q4_0")
    with pytest.raises(DeployError, match="low-rank part has no place"):
        write_gguf(model, tok_dir, tmp_path / "a.gguf", "auto")
    assert not any(tmp_path.iterdir())
    with pytest.warns(UserWarning, match="re-quantised by round-to-nearest"):
        info = write_gguf(model, tok_dir, tmp_path / "a.gguf", "auto", requantize=True)
    assert info["requantized"] == ["model.layers.0.self_attn.q_proj"]
    assert info["layers"]["exact:q4_1"] == 6
    assert 0 < info["q4_1_offset_error"] < 1e-3  # Q4_1's fp16 offsets, reported
    theirs = reader_logits(READ_GGUF, [tmp_path / "a.gguf"], ids, tmp_path)
    assert 0 < relative(theirs, logits) < 0.05
    info = write_gguf(model, tok_dir, tmp_path / "f.gguf", "f32", embedding_type="f32")
    assert info["layers"] == {"f32": 210}  # everything folded, low-rank included
    theirs = reader_logits(READ_GGUF, [tmp_path / "f.gguf"], ids, tmp_path)
    assert relative(theirs, logits) <= 1e-5
    with pytest.raises(FileExistsError):
        write_gguf(model, tok_dir, tmp_path / "f.gguf", "f32")


def test_gguf_refuses_a_non_llama_model(minilm, tmp_path):
    with pytest.raises(ValueError, match="writes the llama architecture.*'bert'"):
        write_gguf(minilm[0], resolve_model_dir("minilm-l6"), tmp_path / "m.gguf")
    assert not any(tmp_path.iterdir())
