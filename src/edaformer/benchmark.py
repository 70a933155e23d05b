"""Timing and memory measurement shared by ``edaformer bench`` and the scripts in ``benchmarks/``.

Protocol (see ``benchmarks/README.md``):

* latency: ``warmup`` untimed calls, then ``runs`` timed calls; the median is reported with the
  inter-quartile range and min/max. CUDA work is synchronized before each clock read. The process
  CPU time of each run is recorded too: on a shared machine it is much less noisy than wall time.
* several models are compared *interleaved* (one call of each per round, order alternating), so
  drifting load on a shared machine hits them alike;
* peak memory: CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the call;
  CPU the peak resident set size above the resident size just before the call, measured in a fresh
  child process (``spawn``) per configuration, so that neither the allocator's cache nor earlier
  runs hide or inflate the figure.
"""
from __future__ import annotations

import contextlib
import json
import gc
import importlib
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .utils import resolve_device

__all__ = ["DTYPES", "Timing", "emit_report", "resolve_dtype", "resolve_device", "synchronize", "autocast_context",
           "time_callable", "time_interleaved", "gflops", "prepare_model", "make_input",
           "forward_fn", "peak_memory_cuda", "peak_memory_cpu_child", "run_in_child", "measure_peak_rss",
           "inference_peak_memory", "reset_peak_rss", "current_rss_bytes", "peak_rss_bytes", "build_named",
           "format_table", "run_isr_sweep", "environment", "to_jsonable"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Mixed precision for ``bf16``/``fp16`` (weights stay float32); nothing for ``fp32``."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# -- timing -------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds per call: ``wall`` and process ``cpu`` time of each timed run."""

    wall: list[float]
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def q1(self) -> float:
        return _quantile(self.wall, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.wall, 0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def min(self) -> float:
        return min(self.wall)

    @property
    def max(self) -> float:
        return max(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")

    def summary(self, batch: int = 1) -> dict:
        """Milliseconds and images/s (from the median)."""
        return dict(median_ms=1e3 * self.median, q1_ms=1e3 * self.q1, q3_ms=1e3 * self.q3,
                    iqr_ms=1e3 * self.iqr, min_ms=1e3 * self.min, max_ms=1e3 * self.max,
                    cpu_median_ms=1e3 * self.cpu_median, runs=len(self.wall),
                    images_per_s=batch / self.median if self.median > 0 else float("inf"))


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy."""
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = (len(v) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    synchronize(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    synchronize(device)
    t1, c1 = time.perf_counter(), time.process_time()
    del out
    return t1 - t0, c1 - c0


def time_callable(fn: Callable[[], Any], runs: int = 10, warmup: int = 2,
                  device: torch.device | str = "cpu") -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``runs`` timed ones."""
    return time_interleaved({"fn": fn}, runs, warmup, device)["fn"]


def time_interleaved(fns: Mapping[str, Callable[[], Any]], runs: int = 10, warmup: int = 2,
                     device: torch.device | str = "cpu") -> dict[str, Timing]:
    """Time several callables round-robin: each round calls every one once, alternating the order
    between rounds so that a slow phase of a shared machine does not favour either."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    device = torch.device(device)
    names = list(fns)
    for _ in range(max(0, warmup)):
        for name in names:
            _timed_call(fns[name], device)
    out = {name: Timing([], []) for name in names}
    for i in range(runs):
        for name in (names if i % 2 == 0 else names[::-1]):
            wall, cpu = _timed_call(fns[name], device)
            out[name].wall.append(wall)
            out[name].cpu.append(cpu)
    return out


# -- model preparation ---------------------------------------------------------------------------
def gflops(model: nn.Module, size: Sequence[int]) -> float | None:
    """Published-convention GFLOPs of ``model`` at ``size`` (``None`` if the counter is unavailable)."""
    try:
        from .flops import count_flops
    except ImportError:
        return None
    return count_flops(model, tuple(size)).gflops


def prepare_model(model: nn.Module, device: torch.device | str = "cpu", *, channels_last: bool = False,
                  compile: bool = False, compile_mode: str | None = None) -> nn.Module:
    """Eval mode on ``device`` (float32 weights; lower precision goes through autocast), optionally
    channels-last weights and ``torch.compile``."""
    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, mode=compile_mode, fullgraph=True, dynamic=False)
    return model


def make_input(batch: int, size: Sequence[int], device: torch.device | str = "cpu", *,
               channels_last: bool = False, in_chans: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_chans, int(size[0]), int(size[1]), generator=g).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def forward_fn(model: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Callable:
    """A no-argument inference call of ``model(x)`` (``inference_mode`` and autocast)."""
    def run():
        with torch.inference_mode(), autocast_context(device, dtype):
            return model(x)
    return run


# -- memory ----------------------------------------------------------------------------------------
def peak_memory_cuda(fn: Callable[[], Any], device: torch.device | str = "cuda") -> int:
    """Bytes allocated at the peak of ``fn()`` above what was allocated before it (CUDA)."""
    device = torch.device(device)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) - before


def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_kb() -> int:
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _resolve(path: str) -> Callable:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process; False where not possible."""
    return _reset_peak_rss()


def current_rss_bytes() -> int | None:
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb * 1024


def peak_rss_bytes() -> int:
    return _peak_rss_kb() * 1024


def measure_peak_rss(run: Callable[[], Any]) -> dict:
    """Peak resident-set growth of ``run()`` in this process: ``{"peak_bytes", "exact"}``.

    Meant for a fresh process (see :func:`run_in_child`): memory the allocator kept from earlier
    work would otherwise be reused without showing up. ``exact`` is False where the peak mark could
    not be reset and the process-lifetime peak had to be used (an upper bound).
    """
    gc.collect()
    exact = _reset_peak_rss()
    before = _proc_status_kb("VmRSS")
    if before is None:
        before, exact = _peak_rss_kb(), False
    out = run()
    peak = _peak_rss_kb()
    del out
    return dict(peak_bytes=max(0, peak - before) * 1024, exact=exact, rss_before_bytes=before * 1024)


def _child_main(queue, target: str, kwargs: dict, sys_path: list[str]) -> None:
    try:
        sys.path[:0] = list(sys_path)
        queue.put(dict(ok=True, **_resolve(target)(**kwargs)))
    except BaseException as e:  # report, never hang the parent
        queue.put(dict(ok=False, error=f"{type(e).__name__}: {e}"))


def run_in_child(target: str, kwargs: Mapping[str, Any], *, sys_path: Sequence[str] = (),
                 timeout: float = 1800.0) -> dict:
    """Call ``target`` (``"module:function"``, returning a dict) in a fresh ``spawn`` process.

    Returns the function's dict with ``ok=True``, or ``{"ok": False, "error": ...}``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_main, args=(queue, target, dict(kwargs), list(sys_path)))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:  # queue.Empty on timeout, or the child died (e.g. out of memory)
        result = dict(ok=False, error=f"no result (exit code {proc.exitcode}; killed or over {timeout:.0f} s)")
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return result


def _smallest_input(model: nn.Module) -> tuple[int, int]:
    """64 x 64, or the smallest input the model's ISR setting accepts if that is larger."""
    if hasattr(model, "check_input_size"):
        from .export import min_input_side

        return max(64, min_input_side(model, 0)), max(64, min_input_side(model, 1))
    return 64, 64


def inference_peak_memory(builder: str, builder_kwargs: dict, batch: int, size: Sequence[int],
                          dtype: str = "fp32", threads: int | None = None, channels_last: bool = False) -> dict:
    """(Run in a fresh process.) Build a model with ``builder(**builder_kwargs)`` and measure the
    peak RSS growth of one inference forward pass at ``batch x size``."""
    if threads:
        torch.set_num_threads(threads)
    model = prepare_model(_resolve(builder)(**builder_kwargs), "cpu", channels_last=channels_last)
    device, dt = torch.device("cpu"), resolve_dtype(dtype)
    # initialise the kernels' one-time state on the smallest input the model takes, so the figure
    # is the forward's own (memory freed by a same-size warm-up would be reused unseen)
    small = _smallest_input(model)
    with contextlib.suppress(Exception):  # best effort: the measured call reports real errors
        forward_fn(model, make_input(1, small, channels_last=channels_last), device, dt)()
    x = make_input(batch, size, channels_last=channels_last)
    return measure_peak_rss(forward_fn(model, x, device, dt))


def peak_memory_cpu_child(builder: str, builder_kwargs: Mapping[str, Any], batch: int, size: Sequence[int], *,
                          dtype: str = "fp32", threads: int | None = None, channels_last: bool = False,
                          sys_path: Sequence[str] = (), timeout: float = 1800.0) -> dict:
    """Peak resident-memory growth of one CPU inference forward pass, in a fresh child process.

    ``builder`` is ``"module:function"``; ``function(**builder_kwargs)`` must return the model
    (importable in the child; ``sys_path`` entries are prepended there).
    """
    return run_in_child("edaformer.benchmark:inference_peak_memory",
                        dict(builder=builder, builder_kwargs=dict(builder_kwargs), batch=batch,
                             size=tuple(int(s) for s in size), dtype=dtype, threads=threads,
                             channels_last=channels_last),
                        sys_path=sys_path, timeout=timeout)


def build_named(name: str, isr: str | None = None, num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """A named model (random weights from ``seed``) with an ISR setting: the default benchmark builder."""
    from .models import create_model

    torch.manual_seed(seed)
    return create_model(name, num_classes=num_classes, isr=isr).eval()


# -- reporting ---------------------------------------------------------------------------------
def environment() -> dict:
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    env = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), torch=torch.__version__, python=platform.python_version(),
               platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
               cpu_capability=getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")())
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return format(value, spec or ".3g")
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table. ``columns``: ``(key, header, format spec)``; missing values print ``-``."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(row.get(k), spec) for k, _, spec in columns) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def run_isr_sweep(model: nn.Module, size: Sequence[int], settings: Sequence[str], *, batch: int = 1,
                  runs: int = 10, warmup: int = 2, device: torch.device | str = "cpu", dtype: str = "fp32",
                  channels_last: bool = False) -> list[dict]:
    """Latency, images/s and GFLOPs of ``model`` per ISR setting (the ``edaformer bench`` table).

    The settings are timed round-robin (one call per setting and round), as in
    :func:`time_interleaved`; the model's own ISR setting is restored afterwards.
    """
    from .isr import parse_isr

    device = resolve_device(device)
    dt = resolve_dtype(dtype)
    h, w = int(size[0]), int(size[1])
    settings = [str(parse_isr(s)) for s in settings]
    previous = model.isr
    model = prepare_model(model, device, channels_last=channels_last)
    x = make_input(batch, (h, w), device, channels_last=channels_last)

    def call(spec: str) -> Callable:
        fn = forward_fn(model, x, device, dt)

        def run():
            model.set_isr(spec)
            return fn()
        return run

    try:
        for spec in settings:
            model.set_isr(spec)
            model.check_input_size(h, w)
        timings = time_interleaved({s: call(s) for s in settings}, runs, warmup, device)
        rows = []
        for spec in settings:
            model.set_isr(spec)
            rows.append(dict(isr=spec, size=f"{h}x{w}", batch=batch, device=device.type, dtype=dtype,
                             gflops=gflops(model, (h, w)), **timings[spec].summary(batch)))
    finally:
        model.set_isr(previous)
    return rows


def to_jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj


def emit_report(result: Any, text: str, json_target: str | None) -> None:
    """Print ``text`` (or the JSON of ``result`` when ``json_target`` is ``"-"``); with a
    path as ``json_target``, also write the JSON there."""
    payload = json.dumps(to_jsonable(result), indent=2)
    if json_target == "-":
        print(payload)
        return
    print(text)
    if json_target:
        with open(json_target, "w", encoding="utf-8") as f:
            f.write(payload)
