"""Where the time goes: operator profiles of edaformer and the reference-style baseline.

Two views of one inference forward pass (after a warm-up pass):

* ``--mode dispatch`` (default): thread CPU time per ATen operator as called from Python (a
  ``TorchDispatchMode``), single-threaded. CPU time, not wall time, so other processes on a
  shared machine barely move it; it also counts the kernel time spent in page faults.
* ``--mode profiler``: ``torch.profiler`` top operators by self CPU time (wall clock inside each
  operator, including the operators a kernel calls internally, e.g. ``copy_`` in ``addmm``).

Also prints the page faults and user/system CPU time of the forward pass.

    python benchmarks/profile_ops.py --model edaformer-t-ade20k --size 512x512 --threads 1
"""
from __future__ import annotations

import argparse
import collections
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from edaformer import bench as bm  # noqa: E402

import harness  # noqa: E402


class OpTimer(TorchDispatchMode):
    """Thread CPU time and call count per ATen operator packet."""

    def __init__(self):
        super().__init__()
        self.stats = collections.defaultdict(lambda: [0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.thread_time()
        out = func(*args, **(kwargs or {}))
        entry = self.stats[str(func.overloadpacket)]
        entry[0] += 1
        entry[1] += time.thread_time() - t0
        return out


def dispatch_profile(model, x, repeats: int) -> dict[str, tuple[int, float]]:
    totals = collections.defaultdict(lambda: [0, 0.0])
    for _ in range(repeats):
        timer = OpTimer()
        with torch.inference_mode(), timer:
            model(x)
        for k, (n, t) in timer.stats.items():
            totals[k][0] = n
            totals[k][1] += t / repeats
    return {k: (n, t) for k, (n, t) in totals.items()}


def fault_profile(model, x) -> dict:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(x)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return dict(minor_faults=r1.ru_minflt - r0.ru_minflt, user_ms=1e3 * (r1.ru_utime - r0.ru_utime),
                system_ms=1e3 * (r1.ru_stime - r0.ru_stime), wall_ms=1e3 * wall)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="edaformer-t-ade20k")
    p.add_argument("--size", default="512x512")
    p.add_argument("--isr", default="1111-111")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mode", choices=["dispatch", "profiler"], default="dispatch")
    p.add_argument("--repeats", type=int, default=2, help="forward passes averaged (dispatch mode)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--which", default="ours,baseline")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    h, _, w = args.size.partition("x")
    size = (int(h), int(w or h))
    import reference_style

    ours = harness.build_named(args.model, isr=args.isr)
    models = {"ours": ours, "baseline": reference_style.from_model(ours).eval()}
    x = bm.make_input(args.batch, size)
    print(f"{args.model} {size[0]}x{size[1]} batch {args.batch} ISR {args.isr}, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    for name in args.which.split(","):
        model = models[name]
        with torch.inference_mode():
            model(x)  # warm-up
        faults = fault_profile(model, x)
        print(f"\n## {name}: {faults['wall_ms']:.0f} ms wall, {faults['user_ms']:.0f} ms user + "
              f"{faults['system_ms']:.0f} ms system CPU, {faults['minor_faults']} minor page faults")
        if args.mode == "dispatch":
            stats = dispatch_profile(model, x, args.repeats)
            total = sum(t for _, t in stats.values())
            print(f"\nthread CPU time per operator (total {1e3 * total:.0f} ms, mean of {args.repeats} passes)\n")
            print("| operator | calls | CPU ms | share |\n|---|---|---|---|")
            for op, (n, t) in sorted(stats.items(), key=lambda kv: -kv[1][1])[:args.top]:
                print(f"| {op} | {n} | {1e3 * t:.1f} | {t / total:.1%} |")
        else:
            from torch.profiler import ProfilerActivity, profile

            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                model(x)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                            max_name_column_width=50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
