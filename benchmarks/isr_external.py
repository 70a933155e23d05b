"""ISR on SegFormer (transformers) and PVTv2 (timm): GFLOPs per setting, optionally CPU latency.

FLOPs come from :func:`edaformer.flops.count_flops_external` on models built on ``meta``
(no weights, no download). ``--time`` also runs randomly initialised models on CPU, the settings
interleaved round-robin in one process (:func:`edaformer.bench.time_interleaved`), and reports
each setting's median latency relative to the first setting.

    python benchmarks/isr_external.py --size 512x512 --specs 1111,2211,2222
    python benchmarks/isr_external.py --models segformer-b0 --time --repeats 10 --threads 1 --json -
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import edaformer  # noqa: E402
from edaformer import bench as bm  # noqa: E402
from edaformer.flops import count_flops_external  # noqa: E402

import harness  # noqa: E402

# MiT encoders of SegFormer B0-B5: hidden sizes, depths, decode-head width (150 ADE20K classes).
MIT = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256), "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768), "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768), "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
}
PVT = ("b0", "b1", "b2", "b2_li", "b3", "b4", "b5")
MODELS = [f"segformer-{v}" for v in MIT] + [f"pvt_v2_{v}" for v in PVT]


def build(name: str, device: str = "meta") -> torch.nn.Module:
    """SegFormer-Bx (SegformerForSemanticSegmentation, 150 classes) or a timm PVTv2 backbone."""
    with torch.device(device):
        if name.startswith("segformer-"):
            import transformers

            hidden, depths, head = MIT[name.split("-")[1]]
            config = transformers.SegformerConfig(hidden_sizes=hidden, depths=depths, decoder_hidden_size=head,
                                                  num_labels=150)
            return transformers.SegformerForSemanticSegmentation(config).eval()
        import timm

        return timm.create_model(name, pretrained=False).eval()


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def flops_rows(names, specs, size) -> list[dict]:
    rows = []
    for name in names:
        model = build(name)
        for spec in specs:
            edaformer.set_isr(model, spec)
            report = count_flops_external(model, size)
            rows.append({"model": name, "isr": spec, "gflops": round(report.gflops, 3),
                         "attention_gflops": round(report.attention_flops / 1e9, 3)})
    return rows


def time_rows(names, specs, size, repeats: int, warmup: int) -> list[dict]:
    rows = []
    for name in names:
        model = build(name, "cpu")
        x = torch.randn(1, 3, *size)

        def call(spec: str):
            def run():
                edaformer.set_isr(model, spec)
                with torch.inference_mode():
                    return model(x)
            return run

        timings = bm.time_interleaved({s: call(s) for s in specs}, repeats, warmup)
        first = timings[specs[0]].median
        rows += [{"model": name, "isr": s, "median_ms": round(1e3 * t.median, 1), "iqr_ms": round(1e3 * t.iqr, 1),
                  "relative": round(t.median / first, 3)} for s, t in timings.items()]
    return rows


def format_text(result: dict) -> str:
    specs = list(dict.fromkeys(r["isr"] for r in result["flops"]))
    lines = [f"GFLOPs at {result['size'][0]}x{result['size'][1]} (attention term in brackets)",
             "| model | " + " | ".join(specs) + " |", "|---" * (len(specs) + 1) + "|"]
    for name in dict.fromkeys(r["model"] for r in result["flops"]):
        cells = [f"{r['gflops']:.2f} ({r['attention_gflops']:.2f})" for r in result["flops"] if r["model"] == name]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "latency" in result:
        env = result["environment"]
        lines += ["", f"CPU latency, median ms (relative to {specs[0]}); torch {env['torch']}, "
                      f"{env['torch_threads']} thread(s)"]
        lines += [f"  {r['model']:14s} {r['isr']}: {r['median_ms']:9.1f} ms  IQR {r['iqr_ms']:7.1f}  "
                  f"x{r['relative']:.3f}" for r in result["latency"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--specs", default="1111,2211,2222", help="comma-separated 4-digit ISR specs")
    parser.add_argument("--size", default="512x512", type=parse_size, help="HxW input size")
    parser.add_argument("--time", action="store_true", help="also time the settings on CPU (interleaved)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    names, specs = args.models.split(","), args.specs.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"size": list(args.size), "environment": bm.environment(),
              "flops": flops_rows(names, specs, args.size)}
    if args.time:
        result["latency"] = time_rows(names, specs, args.size, args.repeats, args.warmup)
    harness.emit_report(result, format_text(result), args.json)


if __name__ == "__main__":
    main()
