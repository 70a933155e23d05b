"""A prepared GPU check: one run on a CUDA card, one report.

Sections (run in this order; a row that fails is reported in the table, the run goes on):

* ``ddp``: a one-process NCCL start: ``init_process_group`` (world size 1, a free localhost
  port), ``DistributedDataParallel``, one forward/backward, ``destroy_process_group``.
* ``train``: 50 mixed-precision training iterations of EDAFormer-T on one fixed random batch
  (fixed seed; a learnable toy task: a few classes painted as blocks of noisy colours), in bf16
  autocast and in fp16 autocast with ``torch.amp.GradScaler``; first and last loss, and whether
  the loss fell.
* ``compile``: ``torch.compile`` of EDAFormer-T at 512x512 (fp32): compile time (first call)
  and latency, interleaved with eager.
* ``inference``: latency (median of synchronized timed calls after warm-up) and images/s of
  EDAFormer-T and -B at 512x512 (``edaformer-{t,b}-ade20k``) and 1024x2048
  (``edaformer-{t,b}-cityscapes``, as ``bench_inference.py`` does), fp32 / fp16 / bf16, the
  default ISR ``1111-111`` and ``2211-222``, each next to the reference-style forward
  (``reference_style.from_model``: same weights, same ISR, same precision), timed interleaved,
  with the ours/baseline ratio and the peak memory of one call of each.

Precision: fp16 and bf16 are ``torch.autocast``; the weights stay float32 (no ``model.half()``).
``torch.backends.cudnn.benchmark`` is on unless ``--no-cudnn-benchmark``; the float32 matmul
precision is torch's default unless ``--tf32``.

Without CUDA the script says so in one line and exits 0. ``--device cpu --quick`` is a dry run
of every section on the CPU at tiny sizes (64x64, 2 iterations, gloo instead of NCCL): it checks
the code paths, its timings mean nothing.

``--budget-s`` is a soft limit on the wall time: once it is spent, the remaining rows are
skipped (and reported as skipped). Exit status: 0 when no row failed, 1 otherwise.

    python benchmarks/gpu_check.py --json gpu_check.json          # stops starting rows after 420 s
    python benchmarks/gpu_check.py --device cpu --quick            # dry run on the CPU
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
import reference_style  # noqa: E402

SECTIONS = ("ddp", "train", "compile", "inference")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DATASET_FOR_SIZE = {(512, 512): "ade20k", (1024, 2048): "cityscapes"}
ISR_ON = "2211-222"


# -- small helpers ------------------------------------------------------------------------------
def model_name(short: str, size: tuple[int, int]) -> str:
    """``t``/``b`` -> ``edaformer-t-ade20k`` at 512x512, ``edaformer-t-cityscapes`` at 1024x2048
    (the benchmarks' convention); other sizes use the ADE20K models; full names pass through."""
    if short.startswith("edaformer-") or short.startswith("segformer-"):
        return short
    return f"edaformer-{short}-{DATASET_FOR_SIZE.get(size, 'ade20k')}"


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().strip().partition("x")
    return int(h), int(w or h)


def split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for fp16/bf16 (weights stay float32); nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def forward_call(model, x, device, dtype):
    def call():
        with torch.inference_mode(), autocast(device, dtype):
            return model(x)
    return call


def time_interleaved(fns: dict, warmup: int, runs: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed rounds, then ``runs`` timed rounds,
    one call of each per round, the order alternating; the device is synchronized around each call."""
    names = list(fns)
    for _ in range(max(0, warmup)):
        for name in names:
            fns[name]()
    sync(device)
    out = {name: [] for name in names}
    for i in range(runs):
        for name in (names if i % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            result = fns[name]()
            sync(device)
            out[name].append(time.perf_counter() - t0)
            del result
    return out


def peak_mb(fn, device: torch.device) -> float | None:
    """CUDA: MiB allocated at the peak of one call above what was allocated before it."""
    if device.type != "cuda":
        return None
    return harness.peak_memory_cuda(fn, device) / 2**20


def free_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free / 2**30


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe_error(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:160]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline_attention_gb(model, batch: int, size: tuple[int, int]) -> float | None:
    """The largest attention matrices the baseline materializes (``bench_inference.py``'s
    estimate), in GiB; None where that estimate is unavailable."""
    try:
        import bench_inference

        return bench_inference.baseline_attention_bytes(model, batch, size) / 2**30
    except Exception:  # the estimate leans on model internals: best effort
        return None


class Budget:
    """A soft wall-time limit: ``spent()`` is true once ``seconds`` have passed since the start."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def spent(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds


# -- the report ----------------------------------------------------------------------------------
class Report:
    def __init__(self, args, environment: dict):
        self.args = args
        self.result = dict(command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), environment=environment,
                           settings=dict(device=args.device, quick=args.quick, warmup=args.warmup, runs=args.runs,
                                         batch=args.batch, precision="torch.autocast (weights float32)",
                                         budget_s=args.budget_s), rows=[])

    @property
    def rows(self) -> list[dict]:
        return self.result["rows"]

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        print(progress_line(row), flush=True)
        self.save()
        return row

    def save(self) -> None:
        """Write the JSON after every row, so a run cut short still leaves what it measured."""
        if self.args.json:
            self.result["elapsed_s"] = round(self.args.budget.elapsed(), 1)
            with open(self.args.json, "w", encoding="utf-8") as f:
                json.dump(self.result, f, indent=2, default=str)


def progress_line(r: dict) -> str:
    what = " ".join(str(r[k]) for k in ("section", "model", "size", "dtype", "isr") if r.get(k) is not None)
    bits = []
    for key, label, fmt in (("ours_ms", "ours", ".2f"), ("base_ms", "baseline", ".2f"), ("ratio", "ratio", ".3f"),
                            ("first_loss", "first loss", ".4f"), ("last_loss", "last loss", ".4f"),
                            ("compile_s", "compile s", ".1f"), ("eager_ms", "eager", ".2f"),
                            ("compiled_ms", "compiled", ".2f"), ("wall_s", "s", ".1f")):
        if r.get(key) is not None:
            bits.append(f"{label} {format(r[key], fmt)}")
    return f"[{r['status']}] {what}: " + ", ".join(bits) + (f" ({r['note']})" if r.get("note") else "")


def fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k), spec) for k, _, spec in columns) + " |")
    return "\n".join(lines)


INFERENCE_COLUMNS = [("model", "model", ""), ("size", "size", ""), ("batch", "batch", ""), ("dtype", "dtype", ""),
                     ("isr", "ISR", ""), ("ours_ms", "ours ms", ".2f"), ("ours_img_s", "ours img/s", ".1f"),
                     ("ours_peak_mb", "ours MB", ".0f"), ("base_ms", "baseline ms", ".2f"),
                     ("base_img_s", "baseline img/s", ".1f"), ("base_peak_mb", "baseline MB", ".0f"),
                     ("ratio", "ours/baseline", ".3f"), ("status", "status", ""), ("note", "note", "")]
TRAIN_COLUMNS = [("model", "model", ""), ("size", "crop", ""), ("batch", "batch", ""), ("dtype", "dtype", ""),
                 ("scaler", "grad scaler", ""), ("iterations", "iterations", ""), ("first_loss", "first loss", ".4f"),
                 ("last_loss", "last loss", ".4f"), ("fell", "loss fell", ""), ("ms_per_it", "ms/it", ".1f"),
                 ("final_scale", "final scale", ".0f"), ("status", "status", ""), ("note", "note", "")]
DDP_COLUMNS = [("backend", "backend", ""), ("world_size", "world size", ""), ("model", "model", ""),
               ("size", "size", ""), ("loss", "loss", ".4f"), ("wall_s", "wall s", ".1f"), ("status", "status", ""),
               ("note", "note", "")]
COMPILE_COLUMNS = [("model", "model", ""), ("size", "size", ""), ("dtype", "dtype", ""), ("backend", "backend", ""),
                   ("compile_s", "compile + first call s", ".1f"), ("eager_ms", "eager ms", ".2f"),
                   ("compiled_ms", "compiled ms", ".2f"), ("speedup", "eager/compiled", ".2f"),
                   ("max_abs_diff", "max abs diff", ".2e"), ("status", "status", ""), ("note", "note", "")]


def header(env: dict, args) -> str:
    lines = [f"# GPU check: `{env['command']}`", ""]
    if env.get("cuda_device"):
        lines.append(f"card: {env['cuda_device']}, {env['cuda_memory_gb']:.1f} GiB, compute capability "
                     f"{env['cuda_capability']}, {env['cuda_sm_count']} SMs, driver {env.get('driver') or '?'}")
    lines.append(f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, NCCL {env['nccl']}, "
                 f"Python {env['python']}, {env['cpu_count']} CPU cores, {env['date']}")
    lines.append(f"device {args.device}; precision: torch.autocast for fp16/bf16, weights float32; cudnn.benchmark "
                 f"{env['cudnn_benchmark']}; float32 matmul precision '{env['float32_matmul_precision']}'; "
                 f"{args.warmup} warm-up + {args.runs} timed calls per function, interleaved; batch {args.batch}")
    if args.quick:
        lines.append("QUICK DRY RUN: tiny sizes and iteration counts; the timings mean nothing.")
    return "\n".join(lines)


def environment(args, device: torch.device) -> dict:
    env = dict(date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"), torch=torch.__version__,
               cuda=torch.version.cuda, python=platform.python_version(), platform=platform.platform(),
               cpu_count=os.cpu_count(), command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               cudnn_benchmark=torch.backends.cudnn.benchmark,
               float32_matmul_precision=torch.get_float32_matmul_precision(), nccl=None)
    with contextlib.suppress(Exception):
        nccl = torch.cuda.nccl.version()
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda_device=torch.cuda.get_device_name(device), cuda_memory_gb=props.total_memory / 2**30,
                   cuda_capability="%d.%d" % torch.cuda.get_device_capability(device),
                   cuda_sm_count=props.multi_processor_count, driver=None)
        with contextlib.suppress(Exception):  # the driver version is not in torch's API
            query = ["nvidia-smi", f"--id={device.index}", "--query-gpu=driver_version", "--format=csv,noheader"]
            env["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip() or None
    return env


def report_text(report: Report) -> str:
    args, rows = report.args, report.rows
    parts = [header(report.result["environment"], args), ""]
    for section, columns, title in (("ddp", DDP_COLUMNS, "DDP start (one process)"),
                                    ("train", TRAIN_COLUMNS, "Mixed-precision training (one fixed batch)"),
                                    ("compile", COMPILE_COLUMNS, "torch.compile vs eager"),
                                    ("inference", INFERENCE_COLUMNS, "Inference: ours vs the reference-style forward")):
        chosen = [r for r in rows if r["section"] == section]
        if chosen:
            parts += [f"## {title}", "", table(chosen, columns), ""]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    parts.append(f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped; "
                 f"{report.args.budget.elapsed():.0f} s wall")
    return "\n".join(parts)


# -- sections ------------------------------------------------------------------------------------
def guarded(report: Report, row: dict, fn) -> dict:
    """Run ``fn(row)`` unless the budget is spent; record a failure in the row instead of raising."""
    args = report.args
    if args.budget.spent():
        row.update(status="skipped", note=f"--budget-s {args.budget_s:.0f} spent")
        return report.add(row)
    t0 = time.perf_counter()
    try:
        fn(row)
        row.setdefault("status", "ok")
    except Exception as e:  # one row's failure must not end the check
        row.update(status="failed", note=describe_error(e))
        if args.verbose:
            traceback.print_exc()
    finally:
        cleanup(args.device_obj)
    row.setdefault("wall_s", time.perf_counter() - t0)
    return report.add(row)


def run_ddp(report: Report) -> None:
    args, device = report.args, report.args.device_obj
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    backend = "nccl" if device.type == "cuda" else "gloo"
    size = args.ddp_size
    row = dict(section="ddp", backend=backend, world_size=1, model=model_name("t", size), size=f"{size[0]}x{size[1]}")

    def body(row):
        if backend == "nccl" and not dist.is_nccl_available():
            raise RuntimeError("this torch build has no NCCL")
        port = free_port()
        t0 = time.perf_counter()
        kwargs = dict(device_id=device) if device.type == "cuda" else {}
        try:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                    timeout=datetime.timedelta(seconds=120), **kwargs)
        except TypeError:  # an older torch without device_id
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                    timeout=datetime.timedelta(seconds=120))
        try:
            model = harness.build_named(row["model"], seed=0).to(device).train()
            ddp = DDP(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 3, *size, generator=g).to(device)
            y = torch.randint(0, model.num_classes, (2, *size), generator=g).to(device)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = F.cross_entropy(ddp(x).float(), y)
                loss.backward()
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            missing = sum(gr is None for gr in grads)
            finite = all(torch.isfinite(gr).all() for gr in grads if gr is not None)
            sync(device)
            row["loss"] = float(loss.detach())
            if missing or not finite:
                row.update(status="failed", note=f"{missing} parameters without gradient, finite: {finite}")
            else:
                row["note"] = f"port {port}, all {len(grads)} gradients finite"
            seen = sorted({str(w.message).splitlines()[0] for w in caught})
            if seen:  # e.g. DDP's bucket-stride warning: worth knowing on the card
                row["warnings"] = seen
                row["note"] += "; warnings: " + " | ".join(w[:100] for w in seen)
        finally:
            dist.destroy_process_group()
        row["wall_s"] = time.perf_counter() - t0

    guarded(report, row, body)


def toy_batch(num_classes: int, batch: int, size: tuple[int, int], seed: int, device: torch.device, classes: int = 6):
    """A learnable fixed batch: ``classes`` labels painted as 32x32-pixel blocks, each a fixed
    random colour plus noise; labels are spread over the model's class range."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    grid = torch.randint(0, classes, (batch, 1, max(1, h // 32), max(1, w // 32)), generator=g)
    blocks = F.interpolate(grid.float(), size=(h, w), mode="nearest").long()[:, 0]
    colours = torch.randn(classes, 3, generator=g)
    x = colours[blocks].permute(0, 3, 1, 2) + 0.5 * torch.randn(batch, 3, h, w, generator=g)
    ids = torch.linspace(0, num_classes - 1, classes).long()
    return x.contiguous().to(device), ids[blocks].to(device)


def run_train(report: Report) -> None:
    args, device = report.args, report.args.device_obj
    size = args.train_size
    for dtype_name in ("bf16", "fp16"):
        use_scaler = dtype_name == "fp16"
        row = dict(section="train", model=model_name("t", size), size=f"{size[0]}x{size[1]}", batch=args.train_batch,
                   dtype=dtype_name, scaler=use_scaler, iterations=args.train_iters)

        def body(row, dtype_name=dtype_name, use_scaler=use_scaler):
            dtype = DTYPES[dtype_name]
            model = harness.build_named(row["model"], seed=0).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=args.train_lr, weight_decay=0.01)
            scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
            x, y = toy_batch(model.num_classes, args.train_batch, size, seed=0, device=device)
            losses, times = [], []
            for _ in range(args.train_iters):
                sync(device)
                t0 = time.perf_counter()
                with autocast(device, dtype):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))  # synchronizes
                times.append(time.perf_counter() - t0)
            row.update(first_loss=losses[0], last_loss=losses[-1], losses=losses,
                       ms_per_it=1e3 * statistics.median(times[1:] or times),
                       final_scale=float(scaler.get_scale()) if use_scaler else None)
            finite = all(math.isfinite(v) for v in losses)
            row["fell"] = bool(finite and losses[-1] < losses[0])
            if not row["fell"]:
                row.update(status="failed", note="the loss did not fall" if finite else "non-finite loss")
            else:
                row["note"] = f"min {min(losses):.4f}; last/first {losses[-1] / losses[0]:.3f}"

        guarded(report, row, body)


def run_inference(report: Report) -> None:
    args, device = report.args, report.args.device_obj
    for short in args.models:
        for size in args.sizes:
            name = model_name(short, size)
            rows = [dict(section="inference", model=name, size=f"{size[0]}x{size[1]}", batch=args.batch,
                         dtype=dt, isr=isr) for dt in args.dtypes for isr in args.isr]
            if args.budget.spent():
                for row in rows:
                    guarded(report, row, None)
                continue
            try:
                ours = harness.build_named(name, seed=0)
                base = reference_style.from_model(ours).eval()
                ours, base = ours.to(device), base.to(device)
                x = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
            except Exception as e:
                for row in rows:
                    row.update(status="failed", note=f"model build: {describe_error(e)}")
                    report.add(row)
                cleanup(device)
                continue
            for row in rows:
                guarded(report, row, lambda row: inference_row(args, row, ours, base, x, size, device))
            del ours, base, x
            cleanup(device)


def inference_row(args, row: dict, ours, base, x, size, device) -> None:
    spec, dtype = row["isr"], DTYPES[row["dtype"]]
    ours.set_isr(spec)
    base.set_isr(spec)
    with_base, notes = not args.no_baseline, []
    att = baseline_attention_gb(ours, args.batch, size)
    room = free_gb(device)
    if with_base and att is not None and room is not None and att > 0.5 * room:
        with_base = False
        notes.append(f"baseline skipped: its attention matrices need {att:.1f} GiB, {room:.1f} GiB free")
    fns = {"ours": forward_call(ours, x, device, dtype)}
    if with_base:
        fns["base"] = forward_call(base, x, device, dtype)
    # one call each first: creates the kernels' state, measures the peak memory; fails early on OOM
    row["ours_peak_mb"] = peak_mb(fns["ours"], device)
    if with_base:
        try:
            row["base_peak_mb"] = peak_mb(fns["base"], device)
        except torch.cuda.OutOfMemoryError:
            cleanup(device)
            del fns["base"]
            notes.append("baseline out of memory")
    times = time_interleaved(fns, args.warmup, args.runs, device)
    for key, t in times.items():
        med = statistics.median(t)
        row[f"{key}_ms"] = med * 1e3
        row[f"{key}_img_s"] = args.batch / med
        row[f"{key}_min_ms"] = min(t) * 1e3
        row[f"{key}_max_ms"] = max(t) * 1e3
    if "base_ms" in row:
        row["ratio"] = row["ours_ms"] / row["base_ms"]
    if notes:
        row["note"] = "; ".join(notes)


def run_compile(report: Report) -> None:
    args, device = report.args, report.args.device_obj
    size = args.compile_size
    row = dict(section="compile", model=model_name("t", size), size=f"{size[0]}x{size[1]}", dtype=args.compile_dtype,
               backend=args.compile_backend)

    def body(row):
        torch.compiler.reset()
        dtype = DTYPES[args.compile_dtype]
        model = harness.build_named(row["model"], seed=0).to(device).eval()
        x = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
        eager = forward_call(model, x, device, dtype)
        notes = []
        try:
            compiled_model = torch.compile(model, backend=args.compile_backend, fullgraph=True, dynamic=False)
            sync(device)
            t0 = time.perf_counter()
            out = forward_call(compiled_model, x, device, dtype)()
            sync(device)
        except Exception as e:  # a graph break: try again without fullgraph, and say so
            notes.append(f"fullgraph failed ({describe_error(e)}); compiled with graph breaks")
            torch.compiler.reset()
            compiled_model = torch.compile(model, backend=args.compile_backend, dynamic=False)
            sync(device)
            t0 = time.perf_counter()
            out = forward_call(compiled_model, x, device, dtype)()
            sync(device)
        row["compile_s"] = time.perf_counter() - t0
        ref = eager()
        row["max_abs_diff"] = float((out.float() - ref.float()).abs().max())
        del out, ref
        times = time_interleaved({"eager": eager, "compiled": forward_call(compiled_model, x, device, dtype)},
                                 args.warmup, args.runs, device)
        row["eager_ms"] = statistics.median(times["eager"]) * 1e3
        row["compiled_ms"] = statistics.median(times["compiled"]) * 1e3
        row["speedup"] = row["eager_ms"] / row["compiled_ms"]
        if notes:
            row["note"] = "; ".join(notes)

    guarded(report, row, body)


RUNNERS = {"ddp": run_ddp, "train": run_train, "compile": run_compile, "inference": run_inference}


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --quick: a dry run)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and counts (64x64, 2 iterations): checks the code paths, not the speed")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--models", default="t,b", help="inference models: t, b or full names (default t,b)")
    p.add_argument("--sizes", default=None, help="inference sizes HxW (default 512x512,1024x2048; quick 64x64)")
    p.add_argument("--dtypes", default="fp32,fp16,bf16", help="inference precisions (default fp32,fp16,bf16)")
    p.add_argument("--isr", default=f"1111-111,{ISR_ON}", help=f"ISR settings (default 1111-111,{ISR_ON})")
    p.add_argument("--batch", type=int, default=1, help="inference batch (default 1; images/s = batch / median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per function (default 5; quick 1)")
    p.add_argument("--runs", type=int, default=None, help="timed calls per function (default 20; quick 2)")
    p.add_argument("--no-baseline", action="store_true", help="time ours only")
    p.add_argument("--train-iters", type=int, default=None, help="training iterations (default 50; quick 2)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default 4; quick 1)")
    p.add_argument("--train-size", default=None, help="training crop (default 512x512; quick 64x64)")
    p.add_argument("--train-lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    p.add_argument("--compile-dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; quick: eager)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft wall-time limit: rows after it are skipped (default 420; quick: none)")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="leave torch.backends.cudnn.benchmark off")
    p.add_argument("--tf32", action="store_true", help="float32 matmuls in TF32 (torch.set_float32_matmul_precision)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON (after every row)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failed row")
    args = p.parse_args(argv)
    q = args.quick
    args.sections = split(args.sections)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    args.models = split(args.models)
    args.sizes = [parse_size(s) for s in split(args.sizes or ("64x64" if q else "512x512,1024x2048"))]
    args.dtypes = split(args.dtypes)
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        p.error(f"unknown dtype(s) {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    args.isr = split(args.isr)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 5)
    args.runs = args.runs if args.runs is not None else (2 if q else 20)
    args.train_iters = args.train_iters if args.train_iters is not None else (2 if q else 50)
    args.train_batch = args.train_batch if args.train_batch is not None else (1 if q else 4)
    args.train_size = parse_size(args.train_size or ("64x64" if q else "512x512"))
    args.compile_size = (64, 64) if q else (512, 512)
    args.ddp_size = (64, 64) if q else (256, 256)
    args.compile_backend = args.compile_backend or ("eager" if q else "inductor")
    if args.budget_s is None and not q:
        args.budget_s = 420.0
    if args.runs < 1 or args.train_iters < 2:
        p.error("--runs must be >= 1 and --train-iters >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.budget = Budget(args.budget_s)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device available (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda}); nothing to check. `--device cpu --quick` is a dry run on the CPU.")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
        if args.tf32:
            torch.set_float32_matmul_precision("high")
    args.device_obj = device
    report = Report(args, environment(args, device))
    print(header(report.result["environment"], args), flush=True)
    for section in SECTIONS:  # fixed order: the short checks first, the long inference grid last
        if section in args.sections:
            RUNNERS[section](report)
    report.result["elapsed_s"] = round(args.budget.elapsed(), 1)
    print()
    print(report_text(report), flush=True)
    report.save()
    return 1 if any(r["status"] == "failed" for r in report.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
