"""Before/after timings of individual optimizations, interleaved in one process.

Variants of edaformer (same weights, same input), each a switch away from the default:

* ``default``: the library as shipped (float32, eager);
* ``huge_pages``: the opt-in huge-page output (``fastpath.options(huge_pages=True)``, outputs of
  at least 32 MiB);
* ``no_ffn_bands``: the FFN computed on the whole map at once
  (``fastpath.options(ffn_band_tokens=None)``);
* ``channels_last``: ``model.to(memory_format=torch.channels_last)`` and a channels-last input;
* ``bf16``: CPU/CUDA autocast to bfloat16; ``fp16``: autocast to float16;
* ``compile``: ``torch.compile(model, fullgraph=True)`` (compile time reported separately);
* ``baseline``: the reference-style implementation (``reference_style.py``).

    python benchmarks/ab_variants.py --size 512x512 --variants default,huge_pages,baseline --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from edaformer import bench as bm  # noqa: E402
from edaformer.models import fastpath  # noqa: E402
from edaformer.utils import resolve_device  # noqa: E402

import harness  # noqa: E402

VARIANTS = ("default", "huge_pages", "no_ffn_bands", "channels_last", "bf16", "fp16", "compile", "baseline")


def build_variants(names, model, x, device):
    import reference_style

    fns, notes = {}, {}
    fp32 = torch.float32

    def with_options(fn, **changes):
        def run():
            with fastpath.options(**changes):
                return fn()
        return run

    for name in names:
        if name == "default":
            fns[name] = bm.forward_fn(model, x, device, fp32)
        elif name == "huge_pages":
            fns[name] = with_options(bm.forward_fn(model, x, device, fp32), huge_pages=True)
        elif name == "no_ffn_bands":
            fns[name] = with_options(bm.forward_fn(model, x, device, fp32), ffn_band_tokens=None)
        elif name == "channels_last":
            import copy

            m = copy.deepcopy(model).to(memory_format=torch.channels_last)
            fns[name] = bm.forward_fn(m, x.contiguous(memory_format=torch.channels_last), device, fp32)
        elif name in ("bf16", "fp16"):
            fns[name] = bm.forward_fn(model, x, device, bm.resolve_dtype(name))
        elif name == "compile":
            compiled = torch.compile(model, fullgraph=True, dynamic=False)
            t0, c0 = time.perf_counter(), time.process_time()
            bm.forward_fn(compiled, x, device, fp32)()
            notes[name] = f"compile + first call: {time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU"
            fns[name] = bm.forward_fn(compiled, x, device, fp32)
        elif name == "baseline":
            fns[name] = bm.forward_fn(reference_style.from_model(model).eval().to(device), x, device, fp32)
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return fns, notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: edaformer-t-ade20k at 512x512, -cityscapes otherwise")
    p.add_argument("--size", default="512x512")
    p.add_argument("--isr", default="1111-111")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", default="default,huge_pages,no_ffn_bands,baseline")
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    h, _, w = args.size.partition("x")
    size = (int(h), int(w or h))
    name = args.model or ("edaformer-t-ade20k" if size == (512, 512) else "edaformer-t-cityscapes")
    model = harness.build_named(name, isr=args.isr).to(device)
    x = bm.make_input(args.batch, size, device)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    fns, notes = build_variants(names, model, x, device)
    if "default" in fns:
        with torch.inference_mode():
            ref = fns["default"]()
            for k, fn in fns.items():
                out = fn().float()
                notes.setdefault(k, "")
                notes[k] = (notes[k] + "; " if notes[k] else "") + f"max abs diff vs default {(out - ref).abs().max().item():.1e}"
            del ref, out
    timings = bm.time_interleaved(fns, args.runs, args.warmup, device)
    base = timings.get("default")
    rows = []
    for k, t in timings.items():
        s = t.summary(args.batch)
        rows.append(dict(variant=k, **s, vs_default=t.median / base.median if base else None,
                         cpu_vs_default=t.cpu_median / base.cpu_median if base else None, note=notes.get(k, "")))
    env = bm.environment()
    print(f"`{' '.join(sys.argv)}`\n\n{env['date']}; torch {env['torch']}; {env['cpu']} ({env['torch_threads']} "
          f"thread(s)); {name} {size[0]}x{size[1]} batch {args.batch} ISR {args.isr}; {args.runs} interleaved runs "
          f"after {args.warmup} warm-up\n")
    print(bm.format_table(rows, [("variant", "variant", ""), ("median_ms", "median ms", ".0f"), ("iqr_ms", "IQR", ".0f"),
                                 ("min_ms", "min", ".0f"), ("max_ms", "max", ".0f"), ("cpu_median_ms", "CPU ms", ".0f"),
                                 ("vs_default", "time vs default", ".3f"), ("cpu_vs_default", "CPU vs default", ".3f"),
                                 ("note", "note", "")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
