"""ISR on SegFormer (transformers) and PVTv2 (timm): GFLOPs per setting, optionally CPU latency.

FLOPs come from :func:`edaformer.isr_adapters.count_flops_external` on models built on ``meta``
(no weights, no download). ``--time`` also runs randomly initialised models on CPU, the settings
interleaved round-robin in one process, and reports each setting's median latency relative to
the first setting.

    python benchmarks/isr_external.py --size 512x512 --specs 1111,2211,2222
    python benchmarks/isr_external.py --models segformer-b0 --time --repeats 10 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import edaformer
from edaformer.isr_adapters import count_flops_external

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
        times: dict[str, list[float]] = {s: [] for s in specs}
        with torch.inference_mode():
            for i in range(warmup + repeats):
                for spec in specs:
                    edaformer.set_isr(model, spec)
                    start = time.perf_counter()
                    model(x)
                    if i >= warmup:
                        times[spec].append(time.perf_counter() - start)
        first = statistics.median(times[specs[0]])
        rows += [{"model": name, "isr": s, "median_s": round(statistics.median(t), 4),
                  "relative": round(statistics.median(t) / first, 3)} for s, t in times.items()]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--specs", default="1111,2211,2222", help="comma-separated 4-digit ISR specs")
    parser.add_argument("--size", default="512x512", type=parse_size, help="HxW input size")
    parser.add_argument("--time", action="store_true", help="also time the settings on CPU (interleaved)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    names, specs = args.models.split(","), args.specs.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"size": list(args.size), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "flops": flops_rows(names, specs, args.size)}
    if args.time:
        result["latency"] = time_rows(names, specs, args.size, args.repeats, args.warmup)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
