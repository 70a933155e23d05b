"""ONNX Runtime benchmark: image -> label map through an exported file, against the torch path.

One process, the same weights (random, seed 0, or ``--checkpoint``), ``--threads`` intra-op threads
for torch and ONNX Runtime alike, timed round-robin (``edaformer.bench.time_interleaved``):

* **torch**: ``Segmenter`` on the model (preprocessing, decoder logits, banded resize + argmax);
* **onnxruntime**: ``Segmenter.from_onnx`` on the file ``edaformer export`` writes from the same
  model (fixed size; the ISR setting baked in): the same preprocessing and banded resize + argmax
  on the logits ONNX Runtime computes;
* **reference**: the reference-style model (``reference_style.py``) on the preprocessed image,
  forward (full-resolution logits) + ``argmax``.

Columns: median, IQR and CPU time per image, the time relative to the torch path and to the
reference, and the share of pixels whose label equals the torch path's.

    python benchmarks/bench_onnxruntime.py --threads 2 --runs 20
    python benchmarks/bench_onnxruntime.py --model edaformer-t-cityscapes --size 1024 2048 --isr 2211-222

Numbers from a shared machine: compare the ratios within one run, not the absolute times.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path[:0] = [str(HERE), str(SRC)]  # reference_style, harness; this checkout's edaformer


def run(args) -> dict:
    import numpy as np
    import torch

    import reference_style
    from edaformer import bench as bm
    from edaformer.checkpoint import build_from_checkpoint
    from edaformer.export import export_onnx
    from edaformer.inference import Segmenter, TestProtocol, preprocess
    from harness import build_named

    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, _ = build_from_checkpoint(args.checkpoint, args.model)
        model.eval()
    else:
        model = build_named(args.model or "edaformer-t-ade20k", num_classes=args.classes, seed=0)
    if args.isr:
        model.set_isr(args.isr)
    protocol = TestProtocol(scale=None, divisor=32)  # the image runs at its own size, sides rounded up to 32
    h, w = args.size
    size = protocol.input_size(h, w)
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    base = reference_style.from_model(model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", size=size, protocol=protocol)
        ours = Segmenter(model, device="cpu", protocol=protocol)
        ort = Segmenter.from_onnx(path, device="cpu", threads=args.threads)

        def reference():
            with torch.inference_mode():
                return base(preprocess(img, protocol)).argmax(1)[0].numpy()

        fns = {"torch: Segmenter": lambda: ours(img), "onnxruntime: Segmenter.from_onnx": lambda: ort(img),
               "reference: forward + argmax": reference}
        labels = {name: np.asarray(fn()) for name, fn in fns.items()}
        timings = bm.time_interleaved(fns, runs=args.runs, warmup=args.warmup)
    torch_ms = timings["torch: Segmenter"].median
    ref_ms = timings["reference: forward + argmax"].median
    expected = labels["torch: Segmenter"]
    rows = [dict(path=name, median_ms=1e3 * t.median, iqr_ms=1e3 * t.iqr, cpu_ms=1e3 * t.cpu_median,
                 vs_torch=t.median / torch_ms, vs_reference=t.median / ref_ms,
                 labels_equal_torch=float((labels[name].astype(np.int64) == expected).mean()))
            for name, t in timings.items()]
    return dict(model=model.name, classes=model.num_classes, isr=str(model.isr), image=[h, w], input=list(size),
                threads=args.threads, runs=args.runs, warmup=args.warmup, environment=bm.environment(), rows=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model name (default edaformer-t-ade20k, or the checkpoint's)")
    p.add_argument("--checkpoint", default=None, help="weights (default: random, seed 0)")
    p.add_argument("--classes", type=int, default=None, help="class count of a random model (default: the model's)")
    p.add_argument("--isr", default=None, help="ISR setting (default: the model's)")
    p.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"), help="image size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results as JSON to this path ('-': only JSON)")
    args = p.parse_args(argv)

    from edaformer.bench import format_table
    from harness import emit_report

    result = run(args)
    text = (f"{result['model']} ({result['classes']} classes), ISR {result['isr']}, {args.size[0]}x{args.size[1]} "
            f"uint8 image (input {result['input'][0]}x{result['input'][1]}) -> label map; {args.threads} thread(s) "
            f"for torch and ONNX Runtime, {os.cpu_count()} CPU(s); {args.runs} runs after {args.warmup} warm-up, "
            "interleaved\n")
    text += format_table(result["rows"], [("path", "path", ""), ("median_ms", "median ms", ".1f"),
                                          ("iqr_ms", "IQR ms", ".1f"), ("cpu_ms", "CPU ms", ".0f"),
                                          ("vs_torch", "time vs torch", ".2f"),
                                          ("vs_reference", "time vs reference", ".2f"),
                                          ("labels_equal_torch", "labels = torch", ".4f")])
    emit_report(result, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
