"""Measurement helpers of the benchmark scripts: peak memory (CUDA, and CPU resident memory in a
fresh child process), the default model builder and report output.

Peak memory: CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the call;
CPU the peak resident set size above the resident size just before the call, measured in a fresh
child process (``spawn``) per configuration, so that neither the allocator's cache nor earlier runs
hide or inflate the figure. Timing lives in :mod:`edaformer.bench`.

The scripts beside this file import it as ``harness`` (they put their folder on ``sys.path``).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import json
import multiprocessing as mp
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import edaformer
from edaformer import bench
from edaformer.models import create_model, fastpath

__all__ = ["peak_memory_cuda", "reset_peak_rss", "current_rss_bytes", "peak_rss_bytes", "measure_peak_rss",
           "run_in_child", "inference_peak_memory", "peak_memory_cpu_child", "build_named", "emit_report"]

# where a spawned child finds this module and the package it measures
_CHILD_PATH = (str(Path(__file__).resolve().parent), str(Path(edaformer.__file__).resolve().parents[1]))


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


def reset_peak_rss() -> bool:
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
    exact = reset_peak_rss()
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
    saved = list(sys.path)
    sys.path[:0] = [p for p in _CHILD_PATH if p not in sys.path]  # a spawned child starts with this path
    try:
        proc.start()
    finally:
        sys.path[:] = saved
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
    if hasattr(model, "min_input_size"):
        min_h, min_w = model.min_input_size()
        return max(64, min_h), max(64, min_w)
    return 64, 64


def inference_peak_memory(builder: str, builder_kwargs: dict, batch: int, size: Sequence[int],
                          dtype: str = "fp32", threads: int | None = None, channels_last: bool = False,
                          fastpath_options: Mapping[str, Any] | None = None) -> dict:
    """(Run in a fresh process.) Build a model with ``builder(**builder_kwargs)`` and measure the
    peak RSS growth of one inference forward pass at ``batch x size`` under ``fastpath_options``
    (see :func:`edaformer.models.fastpath.options`)."""
    if threads:
        torch.set_num_threads(threads)
    with fastpath.options(**dict(fastpath_options or {})):
        return _inference_peak_memory(builder, builder_kwargs, batch, size, dtype, channels_last)


def _inference_peak_memory(builder: str, builder_kwargs: dict, batch: int, size: Sequence[int], dtype: str,
                           channels_last: bool) -> dict:
    model = bench.prepare_model(_resolve(builder)(**builder_kwargs), "cpu", channels_last=channels_last)
    device, dt = torch.device("cpu"), bench.resolve_dtype(dtype)
    # initialise the kernels' one-time state on the smallest input the model takes, so the figure
    # is the forward's own (memory freed by a same-size warm-up would be reused unseen)
    small = _smallest_input(model)
    with contextlib.suppress(Exception):  # best effort: the measured call reports real errors
        bench.forward_fn(model, bench.make_input(1, small, channels_last=channels_last), device, dt)()
    x = bench.make_input(batch, size, channels_last=channels_last)
    return measure_peak_rss(bench.forward_fn(model, x, device, dt))


def peak_memory_cpu_child(builder: str, builder_kwargs: Mapping[str, Any], batch: int, size: Sequence[int], *,
                          dtype: str = "fp32", threads: int | None = None, channels_last: bool = False,
                          fastpath_options: Mapping[str, Any] | None = None, sys_path: Sequence[str] = (),
                          timeout: float = 1800.0) -> dict:
    """Peak resident-memory growth of one CPU inference forward pass, in a fresh child process.

    ``builder`` is ``"module:function"``; ``function(**builder_kwargs)`` must return the model
    (importable in the child; ``sys_path`` entries are prepended there). The child starts with
    the default fast-path options; ``fastpath_options`` changes them there.
    """
    return run_in_child("harness:inference_peak_memory",
                        dict(builder=builder, builder_kwargs=dict(builder_kwargs), batch=batch,
                             size=tuple(int(s) for s in size), dtype=dtype, threads=threads,
                             channels_last=channels_last, fastpath_options=dict(fastpath_options or {})),
                        sys_path=sys_path, timeout=timeout)


def build_named(name: str, isr: str | None = None, num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """A named model (random weights from ``seed``) with an ISR setting: the default benchmark builder."""
    torch.manual_seed(seed)
    return create_model(name, num_classes=num_classes, isr=isr).eval()


def emit_report(result: Any, text: str, json_target: str | None) -> None:
    """Print ``text`` (or the JSON of ``result`` when ``json_target`` is ``"-"``); with a
    path as ``json_target``, also write the JSON there."""
    payload = json.dumps(bench.to_jsonable(result), indent=2)
    if json_target == "-":
        print(payload)
        return
    print(text)
    if json_target:
        with open(json_target, "w", encoding="utf-8") as f:
            f.write(payload)
