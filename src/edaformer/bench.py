"""Timing for ``edaformer bench``: medians with inter-quartile range, interleaved ISR sweeps.

Protocol (see ``benchmarks/README.md``, whose scripts build on this module):

* latency: ``warmup`` untimed calls, then ``runs`` timed calls; the median is reported with the
  inter-quartile range and min/max. CUDA work is synchronized before each clock read. The process
  CPU time of each run is recorded too: on a shared machine it is much less noisy than wall time.
* several callables are compared *interleaved* (one call of each per round, order alternating), so
  drifting load on a shared machine hits them alike.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .flops import gflops
from .isr import parse_isr
from .utils import resolve_device

__all__ = ["DTYPES", "Timing", "resolve_dtype", "synchronize", "autocast_context", "time_callable",
           "time_interleaved", "prepare_model", "make_input", "forward_fn", "format_table",
           "run_isr_sweep", "environment", "to_jsonable"]

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


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for ``bf16``/``fp16`` (weights stay float32); nothing for ``fp32`` or None
    (``torch.autocast`` itself would take None as its device's default lower precision)."""
    if dtype is None or dtype == torch.float32:
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
    device = resolve_device(device)
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


# -- reporting ---------------------------------------------------------------------------------
def environment() -> dict:
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
                  channels_last: bool = False, pool: str = "avg") -> list[dict]:
    """Latency, images/s and GFLOPs of ``model`` per ISR setting (the ``edaformer bench`` table).

    The settings are timed round-robin (one call per setting and round), as in
    :func:`time_interleaved`; ``pool``: the ISR key/value pooling
    kind. The model's own ISR setting and pooling kind are restored afterwards. GFLOPs:
    :func:`edaformer.flops.gflops`.
    """
    device = resolve_device(device)
    dt = resolve_dtype(dtype)
    h, w = int(size[0]), int(size[1])
    settings = [str(parse_isr(s)) for s in settings]
    previous = (model.isr, getattr(model, "isr_pool", "avg"))
    model = prepare_model(model, device, channels_last=channels_last)
    x = make_input(batch, (h, w), device, channels_last=channels_last)

    def call(spec: str) -> Callable:
        fn = forward_fn(model, x, device, dt)

        def run():
            model.set_isr(spec, pool=pool)
            return fn()
        return run

    try:
        for spec in settings:
            model.set_isr(spec, pool=pool)
            model.check_input_size(h, w)
        timings = time_interleaved({s: call(s) for s in settings}, runs, warmup, device)
        rows = []
        for spec in settings:
            model.set_isr(spec, pool=pool)
            rows.append(dict(isr=spec, size=f"{h}x{w}", batch=batch, device=device.type, dtype=dtype,
                             gflops=gflops(model, (h, w)), **timings[spec].summary(batch)))
    finally:
        model.set_isr(previous[0], pool=previous[1])
    return rows


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, dicts, tuples as plain JSON values; NaN and infinities become ``None``."""
    if hasattr(obj, "__dataclass_fields__"):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj
