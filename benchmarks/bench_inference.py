"""Inference benchmark: edaformer vs the reference-style baseline, one table per run.

For every (model, size, batch, ISR setting): latency (median, IQR, min/max over timed runs after
warm-up; ours and the baseline interleaved in this process), images/s, process CPU time, peak
memory (CPU: peak RSS growth of one forward in a fresh child process per model and configuration;
CUDA: ``torch.cuda.max_memory_allocated``), GFLOPs (``edaformer.flops``) and the ours/baseline
latency and memory ratios. See ``benchmarks/README.md`` for the protocol.

    python benchmarks/bench_inference.py --models t --sizes 512x512 --threads 1
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from edaformer import bench as bm  # noqa: E402
from edaformer.flops import gflops  # noqa: E402
from edaformer.isr import PAPER_ISR_SWEEP, parse_isr  # noqa: E402
from edaformer.models import fastpath  # noqa: E402
from edaformer.utils import resolve_device  # noqa: E402

import harness  # noqa: E402

DATASET_FOR_SIZE = {(512, 512): "ade20k", (1024, 2048): "cityscapes"}


def model_name(short: str, size: tuple[int, int]) -> str:
    """``t``/``b`` -> ``edaformer-t-ade20k`` at 512x512, ``edaformer-t-cityscapes`` otherwise."""
    if short.startswith("edaformer-"):
        return short
    return f"edaformer-{short}-{DATASET_FOR_SIZE.get(size, 'cityscapes')}"


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def baseline_attention_bytes(model, batch: int, size: tuple[int, int]) -> int:
    """Bytes of the largest attention matrix the baseline materializes (scores and softmax, fp32)."""
    from edaformer.models.efa import EFA

    h, w = size
    worst = 0
    grids = []
    for i, stage in enumerate(model.encoder.stages):
        k, s = (7, 4) if i == 0 else (3, 2)
        h, w = (h + 2 * (k // 2) - k) // s + 1, (w + 2 * (k // 2) - k) // s + 1
        grids.append((h, w, stage.blocks[0].attn))
    levels = list(zip(grids[1:], model.decoder.levels()))
    for gh, gw, attn in grids + [(g[0], g[1], blocks[0].attn) for g, blocks in levels]:
        assert isinstance(attn, EFA)
        kh, kw = attn.pooled_hw(gh, gw)
        worst = max(worst, batch * attn.num_heads * gh * gw * kh * kw * 4)
    return 2 * worst


def run(args) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    import reference_style

    rows = []
    with fastpath.options(**args.fastpath) as options:
        for short in args.models:
            for size in args.sizes:
                name = model_name(short, size)
                for batch in args.batch:
                    rows += run_group(args, reference_style, name, size, batch, device)
    add_isr_savings(rows)
    return dict(environment=bm.environment(), command=" ".join(sys.argv), runs=args.runs, warmup=args.warmup,
                fastpath=dataclasses.asdict(options), rows=rows)


def run_group(args, reference_style, name, size, batch, device) -> list[dict]:
    """One (model, size, batch): all ISR settings, ours and baseline, timed interleaved together."""
    ours = harness.build_named(name, seed=0)
    base = reference_style.from_model(ours).eval().to(device)
    ours_run = bm.prepare_model(ours, device, channels_last=args.channels_last, compile=args.compile)
    x = bm.make_input(batch, size, device, channels_last=args.channels_last)
    x_base = bm.make_input(batch, size, device)
    dtype = bm.resolve_dtype(args.dtype)
    rows, fns = {}, {}

    def with_isr(model, spec, fn):
        def call():
            model.set_isr(spec)
            return fn()
        return call

    for spec in (str(parse_isr(s)) for s in args.isr):
        ours.set_isr(spec)
        try:
            ours.check_input_size(*size)
        except ValueError as e:
            print(f"skip {name} {size} {spec}: {e}", file=sys.stderr)
            continue
        row = dict(model=name, size=f"{size[0]}x{size[1]}", isr=spec, batch=batch, device=device.type,
                   dtype=args.dtype, compile=args.compile, channels_last=args.channels_last)
        row["gflops"] = None if args.no_flops else gflops(ours, size)
        att = baseline_attention_bytes(ours, batch, size)
        with_base = not args.no_baseline and att <= args.max_baseline_gb * 2**30
        if not with_base and not args.no_baseline:
            row["note"] = f"baseline skipped: its attention matrices alone need {att / 2**30:.1f} GiB"
        if not with_base or spec not in args.baseline_isr and args.baseline_isr != ["all"]:
            with_base = False
        row["_with_base"] = with_base
        rows[spec] = row
        fns[(spec, "ours")] = with_isr(ours, spec, bm.forward_fn(ours_run, x, device, dtype))
        if with_base:
            fns[(spec, "base")] = with_isr(base, spec, bm.forward_fn(base, x_base, device, torch.float32))
    t0 = time.perf_counter()
    timings = bm.time_interleaved(fns, args.runs, args.warmup, device)
    print(f"{name} {size[0]}x{size[1]} b{batch}: timed {len(fns)} configurations interleaved in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    out = []
    for spec, row in rows.items():
        with_base = row.pop("_with_base")
        for key in ("ours", "base"):
            if (spec, key) in timings:
                row.update({f"{key}_{k}": v for k, v in timings[(spec, key)].summary(batch).items()})
        if not args.no_memory:
            ours.set_isr(spec)
            base.set_isr(spec)
            row.update(measure_memory(args, name, spec, batch, size, device, with_base, ours_run, x, base, x_base))
        if with_base:
            row["latency_ratio"] = row["ours_median_ms"] / row["base_median_ms"]
            row["cpu_ratio"] = row["ours_cpu_median_ms"] / row["base_cpu_median_ms"]
            if row.get("ours_peak_mb") and row.get("base_peak_mb"):
                row["memory_ratio"] = row["ours_peak_mb"] / row["base_peak_mb"]
        print(progress_line(row), file=sys.stderr, flush=True)
        out.append(row)
    return out


def measure_memory(args, name, spec, batch, size, device, with_base, ours_run, x, base, x_base) -> dict:
    out = {}
    if device.type == "cuda":
        dt = bm.resolve_dtype(args.dtype)
        out["ours_peak_mb"] = harness.peak_memory_cuda(bm.forward_fn(ours_run, x, device, dt), device) / 2**20
        if with_base:
            out["base_peak_mb"] = harness.peak_memory_cuda(bm.forward_fn(base, x_base, device, torch.float32),
                                                           device) / 2**20
        return out
    kwargs = dict(name=name, isr=spec, seed=0)
    jobs = [("ours", "harness:build_named", args.dtype, args.channels_last)]
    if with_base:
        jobs.append(("base", "reference_style:build", "fp32", False))
    for key, builder, dtype, channels_last in jobs:
        r = harness.peak_memory_cpu_child(builder, kwargs, batch, size, dtype=dtype, threads=args.threads,
                                          channels_last=channels_last, fastpath_options=args.fastpath,
                                          sys_path=[str(HERE)], timeout=args.memory_timeout)
        if r["ok"]:
            out[f"{key}_peak_mb"] = r["peak_bytes"] / 2**20
        else:
            print(f"memory ({key}, {name} {spec} b{batch}): {r['error']}", file=sys.stderr)
    return out


def add_isr_savings(rows: list[dict]) -> None:
    """Per (model, size, batch): time and GFLOP reduction of each ISR setting vs 1111-111, and the
    share of the FLOP reduction that shows up as time saved."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["model"], r["size"], r["batch"]), {})[r["isr"]] = r
    for group in groups.values():
        ref = group.get("1111-111")
        if ref is None:
            continue
        for r in group.values():
            r["time_saving"] = 1 - r["ours_median_ms"] / ref["ours_median_ms"]
            r["cpu_saving"] = 1 - r["ours_cpu_median_ms"] / ref["ours_cpu_median_ms"]
            if r.get("gflops") and ref.get("gflops"):
                r["flop_saving"] = 1 - r["gflops"] / ref["gflops"]
                if r["flop_saving"] > 0:
                    r["saving_share"] = r["time_saving"] / r["flop_saving"]
                    r["cpu_saving_share"] = r["cpu_saving"] / r["flop_saving"]


def progress_line(r: dict) -> str:
    base = f" | base {r['base_median_ms']:.0f} ms ratio {r['latency_ratio']:.3f}" if "base_median_ms" in r else ""
    mem = f" | mem {r.get('ours_peak_mb', float('nan')):.0f}/{r.get('base_peak_mb', float('nan')):.0f} MB"
    return f"{r['model']} {r['size']} b{r['batch']} {r['isr']}: ours {r['ours_median_ms']:.0f} ms{base}{mem}"


COLUMNS = [
    ("model", "model", ""), ("size", "size", ""), ("isr", "ISR", ""), ("batch", "batch", ""),
    ("gflops", "GFLOPs", ".1f"),
    ("ours_median_ms", "ours median ms", ".0f"), ("ours_iqr_ms", "IQR", ".0f"),
    ("ours_min_ms", "min", ".0f"), ("ours_max_ms", "max", ".0f"), ("ours_images_per_s", "img/s", ".3g"),
    ("ours_cpu_median_ms", "CPU ms", ".0f"), ("ours_peak_mb", "peak MB", ".0f"),
    ("base_median_ms", "baseline ms", ".0f"), ("base_iqr_ms", "IQR", ".0f"), ("base_cpu_median_ms", "CPU ms", ".0f"),
    ("base_peak_mb", "baseline MB", ".0f"),
    ("latency_ratio", "latency ratio", ".3f"), ("cpu_ratio", "CPU ratio", ".3f"), ("memory_ratio", "memory ratio", ".3f"),
]
ISR_COLUMNS = [
    ("model", "model", ""), ("size", "size", ""), ("batch", "batch", ""), ("isr", "ISR", ""),
    ("gflops", "GFLOPs", ".1f"), ("flop_saving", "FLOP cut", ".1%"), ("time_saving", "time cut", ".1%"),
    ("saving_share", "time cut / FLOP cut", ".2f"), ("cpu_saving", "CPU-time cut", ".1%"),
    ("cpu_saving_share", "CPU cut / FLOP cut", ".2f"),
]


def report(result: dict) -> str:
    env = result["environment"]
    rows = result["rows"]
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = [f"`{result['command']}`", "",
             f"{env['date']}; torch {env['torch']}; {env['cpu']} ({env['cpu_count']} cores, "
             f"{env['torch_threads']} torch thread(s), {env['cpu_capability']})"
             + (f"; {env['cuda_device']}" if "cuda_device" in env else "")
             + f"; {result['runs']} timed runs after {result['warmup']} warm-up", "",
             bm.format_table(rows, cols)]
    notes = [f"- {r['model']} {r['size']} {r['isr']} b{r['batch']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", *notes]
    if any("time_saving" in r for r in rows):
        lines += ["", bm.format_table([r for r in rows if "time_saving" in r], ISR_COLUMNS)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="t", help="comma list: t, b or full names (default t)")
    p.add_argument("--sizes", default="512x512", help="comma list of HxW (default 512x512)")
    p.add_argument("--isr", default=",".join(PAPER_ISR_SWEEP), help="comma list of ISR settings (default: all four)")
    p.add_argument("--batch", default="1", help="comma list of batch sizes (default 1)")
    p.add_argument("--runs", type=int, default=7, help="timed runs per model and setting (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(bm.DTYPES), default="fp32", help="ours, via autocast (baseline: fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile ours (fullgraph)")
    p.add_argument("--channels-last", action="store_true", help="ours with channels-last weights and input")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-baseline", action="store_true", help="time ours only")
    p.add_argument("--baseline-isr", default="all",
                   help="comma list of the ISR settings that also run the baseline (default: all)")
    p.add_argument("--max-baseline-gb", type=float, default=6.0,
                   help="skip the baseline where its attention matrices alone exceed this (default 6)")
    p.add_argument("--ffn-band-tokens", type=int, default=None, metavar="N",
                   help="CPU fast path: FFN band size in tokens, 0 for whole maps (default: the library's)")
    p.add_argument("--huge-pages", action="store_true", help="CPU fast path: huge-page resize outputs")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-flops", action="store_true", help="skip the GFLOPs column")
    p.add_argument("--memory-timeout", type=float, default=1800.0, help="seconds per memory child (default 1800)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON ('-': stdout)")
    args = p.parse_args(argv)
    args.fastpath = {}
    if args.ffn_band_tokens is not None:
        args.fastpath["ffn_band_tokens"] = args.ffn_band_tokens or None
    if args.huge_pages:
        args.fastpath["huge_pages"] = True
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.isr = [s.strip() for s in args.isr.split(",") if s.strip()]
    args.batch = [int(b) for b in args.batch.split(",") if b.strip()]
    args.baseline_isr = [s.strip() if s.strip() == "all" else str(parse_isr(s)) for s in args.baseline_isr.split(",")
                         if s.strip()]
    result = run(args)
    text = report(result)
    harness.emit_report(result, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
