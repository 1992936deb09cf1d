"""llama.cpp's own quantiser (``llama_model_quantize``, what ``llama-quantize`` runs) on a GGUF,
run in the venv ``build_llamacpp.sh`` builds (no torch, no slimtune there).

Round-to-nearest without calibration: the baseline issue #13 compares slimtune's GPTQ-in-Q4_0
with. ``--embedding-type`` fixes the token embedding's type so both files hold the same types.

    .venv-llamacpp/bin/python llamacpp_quantize.py IN.gguf OUT.gguf [--type q4_0]
        [--embedding-type q8_0] [--threads 2]
"""
import argparse
import ctypes
import json
import os
import time

FTYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
          "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
TYPES = {"q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0", "f32": "GGML_TYPE_F32"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("inp")
    ap.add_argument("out")
    ap.add_argument("--type", choices=sorted(FTYPES), default="q4_0")
    ap.add_argument("--embedding-type", choices=sorted(TYPES), default="q8_0")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = args.threads
    params.ftype = getattr(llama_cpp, FTYPES[args.type])
    params.token_embedding_type = getattr(llama_cpp, TYPES[args.embedding_type])
    tmp = args.out + ".tmp"
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(args.inp.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")
    os.replace(tmp, args.out)
    print(json.dumps({"quantiser": "llama.cpp", "llama_cpp_python": llama_cpp.__version__,
                      "type": args.type, "embedding_type": args.embedding_type,
                      "seconds": time.perf_counter() - start,
                      "mb": os.path.getsize(args.out) / 1e6}))


if __name__ == "__main__":
    main()
