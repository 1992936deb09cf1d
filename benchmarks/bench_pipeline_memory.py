"""Peak memory of the layer-by-layer pipeline: it must not grow with depth.

Runs ``slimtune.calib.run_pipeline`` on SmolLM2-135M with one local step that needs ``"gram"``
on all 7 projections of every block (X^T X in float64, as svd_llm accumulates it) and returns
each layer unchanged, on N × seqlen random PTB-train windows. Reports the pipeline's peak RSS next
to the expected working set

    model size (parameters + buffers) + one block's calibration activations
    (inputs + outputs buffers: 2 × N × seqlen × hidden × 4 bytes) + one block's Gram matrices,

and their ratio (issue #3's target: within 25%). How it is measured (Linux /proc/self/status):

- the RSS after importing torch/transformers/slimtune, before the model is loaded, is printed
  (the Python + library code and heap every run pays, ~0.25 GB);
- the model's safetensors are memory-mapped, so its pages count in RSS only once touched: all
  weights are read once before the pipeline, so the model is fully resident at the start;
- tokenizing the PTB train split leaves ~0.3 GB of freed heap that glibc keeps; ``malloc_trim``
  returns it before the pipeline (it is not the pipeline's memory);
- the peak during the pipeline alone is VmHWM after resetting it (``/proc/self/clear_refs``);
  ``ru_maxrss`` (whole process, tokenizing included) is printed too;
- the step samples the RSS at the end of every block, to show it does not grow with depth.

Two ratios are printed: peak / expected, and (peak - overhead) / expected, where overhead = RSS
right before the pipeline - model size: the interpreter, torch/transformers/tokenizers code and
heap that exist before the pipeline starts (~0.4 GB here, ~80% of the 135M-parameter model itself,
so the plain ratio cannot come near 1 at this size). glibc keeps part of the freed per-batch
memory unless trimmed: ``run_pipeline``'s default ``heap="trim"`` calls ``malloc_trim(0)`` after
every block, ``--heap keep`` keeps freed memory for reuse during the walk and trims once at the
end (``--heap default`` shows glibc's behaviour).

    .venv/bin/python benchmarks/bench_pipeline_memory.py [--n 32] [--seqlen 512] [--batch-size 2]
        [--heap keep|trim|default] [--stats-dtype float64|float32] [--threads N]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import sys
import time

import torch

from slimtune.evaluate import peak_rss_mb
from slimtune.models import load_model
from slimtune.calib import calibration_windows, find_blocks, run_pipeline

MB = 1024 * 1024


class GramOnly:
    """svd-like step: forces Gram accumulation on every projection, changes nothing."""

    targets = "all-linear"
    needs = frozenset({"gram"})

    def __init__(self):
        self.layers, self.block_rss = 0, []

    def apply(self, name, layer, stats):
        assert stats.inputs.gram().shape == (layer.in_features, layer.in_features)
        self.layers += 1
        if name.endswith("down_proj"):  # the last projection of a block: sample the RSS
            self.block_rss.append(_status_mb("VmRSS"))
        return layer


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32, help="calibration windows (default 32)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--heap", choices=["trim", "keep", "default"], default="trim",
                    help="run_pipeline(heap=...): malloc_trim after every block (the default), "
                         "freed memory kept for reuse (mallopt), or glibc's default behaviour")
    ap.add_argument("--stats-dtype", choices=["float64", "float32"], default="float64",
                    help="dtype of the Gram accumulation (float32: as the GPTQ/SparseGPT steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers  # noqa: F401  (part of the runtime baseline)
    runtime_mb = _status_mb("VmRSS")
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f}")
    model, tokenizer = load_model(args.model)
    windows = calibration_windows(tokenizer, "ptb", "train", args.n, args.seqlen, args.seed)
    prefix, blocks = find_blocks(model)
    hidden = model.config.hidden_size
    model_mb = sum(t.numel() * t.element_size()
                   for t in [*model.parameters(), *model.buffers()]) / MB
    acts_mb = 2 * args.n * args.seqlen * hidden * 4 / MB
    gram_mb = sum(m.in_features ** 2 * 8 for m in blocks[0].modules()
                  if isinstance(m, torch.nn.Linear)) / MB
    expected = model_mb + acts_mb + gram_mb
    print(f"model {args.model}: {len(blocks)} blocks at '{prefix}', hidden {hidden}; calibration "
          f"{args.n} × {args.seqlen} PTB train windows (seed {args.seed}), batch size "
          f"{args.batch_size}, heap {args.heap}, statistics in {args.stats_dtype}")

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        print("(malloc_trim unavailable: freed tokenizer heap stays in RSS)")
    with torch.no_grad():  # page the memory-mapped weights in
        touched = sum(float(p.sum()) for p in model.parameters())
    rss_before = _status_mb("VmRSS")
    can_reset = _reset_peak()
    step = GramOnly()
    step.stats_dtype = getattr(torch, args.stats_dtype)
    start = time.perf_counter()
    report = run_pipeline(model, windows, [step], batch_size=args.batch_size, progress=False,
                          heap=args.heap)
    seconds = time.perf_counter() - start
    pipeline_peak = _status_mb("VmHWM") if can_reset else None
    process_peak = peak_rss_mb()

    print(f"layers given Gram statistics: {step.layers}; pipeline time {seconds:.1f} s "
          f"(one run: see bench_pipeline_speed.py for timing)")
    print(f"expected working set: model {model_mb:.1f} MB + activations {acts_mb:.1f} MB "
          f"(2 × {args.n}×{args.seqlen}×{hidden}×4 B) + one block's Gram matrices "
          f"{gram_mb:.1f} MB = {expected:.1f} MB")
    overhead = rss_before - model_mb
    print(f"RSS after imports (no model): {runtime_mb:.1f} MB; RSS before the pipeline (model "
          f"resident, checksum {touched:.3g}): {rss_before:.1f} MB -> overhead besides the model "
          f"{overhead:.1f} MB")
    rss = step.block_rss
    print(f"RSS at the end of blocks 1, {len(rss) // 2 + 1}, {len(rss)}: {rss[0]:.1f}, "
          f"{rss[len(rss) // 2]:.1f}, {rss[-1]:.1f} MB; growth from block 1 to the last "
          f"{rss[-1] - rss[0]:+.1f} MB")
    if pipeline_peak is not None:
        ratio, net = pipeline_peak / expected, (pipeline_peak - overhead) / expected
        print(f"peak RSS during the pipeline (VmHWM after reset): {pipeline_peak:.1f} MB, "
              f"{pipeline_peak - rss_before:+.1f} MB over the RSS before it")
        print(f"  ratio peak / expected {ratio:.3f} (target <= 1.25: "
              f"{'PASS' if ratio <= 1.25 else 'FAIL'})")
        print(f"  ratio (peak - overhead) / expected {net:.3f} (target <= 1.25: "
              f"{'PASS' if net <= 1.25 else 'FAIL'})")
    print(f"peak RSS of the whole process (ru_maxrss, includes tokenizing and loading): "
          f"{process_peak:.1f} MB -> ratio {process_peak / expected:.3f}")
    print(f"pipeline report peak_rss_mb {report['peak_rss_mb']:.1f}")


if __name__ == "__main__":
    main()
