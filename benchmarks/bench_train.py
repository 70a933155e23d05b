"""Training-step benchmark: iterations/s and peak memory, with and without gradient checkpointing.

One iteration = forward in train mode on a ``batch x 3 x H x W`` crop, cross-entropy against random
labels (with some ignored pixels), backward, ``AdamW.step()``, ``zero_grad``. The two variants
(checkpointing off / on) run interleaved in this process on identical copies of the model; peak
memory of one iteration is measured for each in a fresh child process (CPU: peak RSS growth;
CUDA: ``torch.cuda.max_memory_allocated``).

    python benchmarks/bench_train.py --model t --size 512x512 --batch 8 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from edaformer import bench as bm  # noqa: E402
from edaformer.utils import resolve_device  # noqa: E402

import harness  # noqa: E402


def make_step(model, opt, batch: int, size: tuple[int, int], device: torch.device, dtype: torch.dtype):
    """A no-argument training iteration of ``model`` / ``opt`` on fixed random data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (batch, *size), generator=g)
    y[:, :8] = 255  # some ignored pixels, as in padded crops
    y = y.to(device)
    model.train()

    def step():
        with bm.autocast_context(device, dtype):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, ignore_index=255)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)


def train_peak_memory(name: str, batch: int, size: tuple[int, int], checkpointing: bool, dtype: str = "fp32",
                      threads: int | None = None) -> dict:
    """(Run in a fresh process.) Peak RSS growth of one training iteration over the resident
    model, optimizer state and kernels' one-time state (created by a first 64x64 iteration)."""
    if threads:
        torch.set_num_threads(threads)
    model = harness.build_named(name, seed=0)
    model.set_grad_checkpointing(checkpointing)
    device, dt = torch.device("cpu"), bm.resolve_dtype(dtype)
    opt = make_optimizer(model)
    make_step(model, opt, 1, (64, 64), device, dt)()
    return harness.measure_peak_rss(make_step(model, opt, batch, size, device, dt))


def run(args) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dt = bm.resolve_dtype(args.dtype)
    name = args.model if args.model.startswith("edaformer-") else f"edaformer-{args.model}-ade20k"
    base = harness.build_named(name, seed=0).to(device)
    variants = {}
    for ckpt in (False, True):
        model = copy.deepcopy(base)
        model.set_grad_checkpointing(ckpt)
        variants["checkpointing" if ckpt else "plain"] = make_step(model, make_optimizer(model), args.batch,
                                                                   args.size, device, dt)
    timings = bm.time_interleaved(variants, args.runs, args.warmup, device)
    rows = []
    for key, timing in timings.items():
        s = timing.summary(args.batch)
        row = dict(model=name, size=f"{args.size[0]}x{args.size[1]}", batch=args.batch, variant=key,
                   dtype=args.dtype, median_s=s["median_ms"] / 1e3, iqr_s=s["iqr_ms"] / 1e3,
                   min_s=s["min_ms"] / 1e3, max_s=s["max_ms"] / 1e3, cpu_s=s["cpu_median_ms"] / 1e3,
                   it_per_s=1e3 / s["median_ms"], images_per_s=s["images_per_s"])
        if not args.no_memory:
            if device.type == "cuda":
                model = copy.deepcopy(base)
                model.set_grad_checkpointing(key == "checkpointing")
                step = make_step(model, make_optimizer(model), args.batch, args.size, device, dt)
                step()
                row["peak_mb"] = harness.peak_memory_cuda(step, device) / 2**20
            else:
                r = harness.run_in_child("bench_train:train_peak_memory",
                                    dict(name=name, batch=args.batch, size=tuple(args.size),
                                         checkpointing=key == "checkpointing", dtype=args.dtype,
                                         threads=args.threads),
                                    sys_path=[str(HERE)], timeout=args.memory_timeout)
                if r["ok"]:
                    row["peak_mb"] = r["peak_bytes"] / 2**20
                else:
                    print(f"memory ({key}): {r['error']}", file=sys.stderr)
        rows.append(row)
    plain, ck = rows
    ck["time_vs_plain"] = ck["median_s"] / plain["median_s"]
    if "peak_mb" in plain and "peak_mb" in ck:
        ck["memory_vs_plain"] = ck["peak_mb"] / plain["peak_mb"]
    return dict(environment=bm.environment(), command=" ".join(sys.argv), runs=args.runs, warmup=args.warmup,
                rows=rows)


COLUMNS = [("model", "model", ""), ("size", "crop", ""), ("batch", "batch", ""), ("variant", "variant", ""),
           ("median_s", "median s/it", ".2f"), ("iqr_s", "IQR s", ".2f"), ("min_s", "min s", ".2f"),
           ("max_s", "max s", ".2f"), ("cpu_s", "CPU s/it", ".2f"), ("it_per_s", "it/s", ".3f"),
           ("images_per_s", "img/s", ".2f"), ("peak_mb", "peak MB", ".0f"),
           ("time_vs_plain", "time vs plain", ".2f"), ("memory_vs_plain", "memory vs plain", ".2f")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="t", help="t, b or a full name (default t: edaformer-t-ade20k)")
    p.add_argument("--size", default="512x512", help="crop HxW (default 512x512)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--runs", type=int, default=3, help="timed iterations per variant (default 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(bm.DTYPES), default="fp32", help="autocast dtype (default fp32)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-timeout", type=float, default=1800.0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write JSON ('-': stdout only)")
    args = p.parse_args(argv)
    h, _, w = args.size.lower().partition("x")
    args.size = (int(h), int(w or h))
    result = run(args)
    env = result["environment"]
    text = "\n".join([f"`{result['command']}`", "",
                      f"{env['date']}; torch {env['torch']}; {env['cpu']} ({env['cpu_count']} cores, "
                      f"{env['torch_threads']} torch thread(s)); {args.runs} timed iterations after {args.warmup} "
                      f"warm-up", "", bm.format_table(result["rows"], COLUMNS)])
    harness.emit_report(result, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
