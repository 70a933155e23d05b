"""The paper's studies on CamVid: score trained runs under ISR settings and pooling kinds, and write
the tables and plots of docs/paper-on-camvid.md.

Each study row is (run, ISR setting, pool kind); a run is a work dir of `edaformer train` (its
config.yaml and latest.pth). Rows are scored on the run's validation split with its stored test
protocol; GFLOPs are counted at 360x480 (a CamVid frame); latency is one 360x480 forward, timed
round-robin over the rows of a table in one process (so ratios within a table are fair even on a
shared machine). Results are cached in ``--out/studies.json``: a rerun scores only missing rows.

    python benchmarks/camvid_studies.py --runs RUNS_DIR --out docs/paper-on-camvid [--tables 3b 5a ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import edaformer  # noqa: E402  (registers the models)
from edaformer import bench  # noqa: E402
from edaformer.checkpoint import load_checkpoint  # noqa: E402
from edaformer.config import load_config  # noqa: E402
from edaformer.data import build_dataset, eval_transforms  # noqa: E402
from edaformer.engine import build_model, evaluate  # noqa: E402
from edaformer.flops import gflops as count_gflops  # noqa: E402
from edaformer.inference import TestProtocol  # noqa: E402
from edaformer.isr import get_isr  # noqa: E402

SIZE = (360, 480)

# An ISR setting is relative to a model's training ratios: a model trained with ``model.train_isr``
# runs at its training ratios under ``1111-111``.

# table -> rows of (label, run, isr, pool)
TABLES: dict[str, list[tuple[str, str, str | None, str]]] = {
    "3b": [("{3-2-1} seed 0", "base", None, "avg"), ("{3-2-1} seed 1", "base-s1", None, "avg"),
           ("{2-2-2}", "dec222", None, "avg"), ("{1-2-3}", "dec123", None, "avg"), ("{1-4-1}", "dec141", None, "avg")],
    "5a": [("trained full, no ISR (1111-111)", "base", "1111-111", "avg"),
           ("trained full, ISR 2211-222 at inference", "base", "2211-222", "avg"),
           ("trained full (seed 1), ISR 2211-222 at inference", "base-s1", "2211-222", "avg"),
           ("trained at 2211-222, tested at its training ratios (2211-222)", "trainisr", "1111-111", "avg")],
    "6a": [(f"{pool} {isr}", "base", isr, pool) for isr in ("2211-222", "2222-222")
           for pool in ("avg", "max", "overlap", "merge")],
    "7": [(f"SegFormer-B0 {isr}", "segformer-b0", isr, "avg") for isr in ("1111", "2211", "2222")]
    + [(f"EDAFormer-T {isr}", "base", isr, "avg") for isr in ("1111-111", "2211-111", "2222-111")],
    "4": [("base, ISR 2222-222, no fine-tuning", "base", "2222-222", "avg"),
          ("+100 it. at 2222-222 (fine-tuned), tested at its training ratios (2222-222)", "finetune", "1111-111", "avg"),
          ("+100 it. at 1111-111 (control), ISR 2222-222", "cont", "2222-222", "avg"),
          ("+100 it. at 1111-111 (control), 1111-111", "cont", "1111-111", "avg")],
}


def load_run(run_dir: Path):
    cfg = load_config(run_dir / "config.yaml", [])
    data_cfg = {k: v for k, v in cfg["data"].items() if k not in ("batch_size", "workers")}
    dataset = build_dataset(data_cfg, "val")
    model = build_model(cfg["model"], dataset.num_classes, init_weights=False)
    report = load_checkpoint(model, run_dir / "latest.pth")
    model.eval()
    protocol = TestProtocol.resolve(model, report["meta"], base=TestProtocol.from_config(cfg), source=str(run_dir))
    dataset.transforms = eval_transforms(protocol.scale, protocol.size_divisor)
    return cfg, model, dataset, protocol, report["meta"]


def gflops(model, isr, pool) -> float:
    with edaformer.isr(model, isr or get_isr(model), pool=pool if pool != "avg" else None):
        return count_gflops(model, SIZE)


def score_table(name: str, runs: Path, cache: dict, latency_runs: int) -> list[dict]:
    rows, loaded, timed = [], {}, {}
    for label, run, isr, pool in TABLES[name]:
        key = f"{run}|{isr}|{pool}"
        if not (runs / run / "latest.pth").is_file():
            print(f"table {name}: {label}: run {runs / run} has no latest.pth yet, skipped")
            continue
        if run not in loaded:
            loaded[run] = load_run(runs / run)
        cfg, model, dataset, protocol, meta = loaded[run]
        if key not in cache:
            metrics = evaluate(model, dataset, protocol, isr=isr, pool=pool, workers=0, progress=True)
            cache[key] = dict(mIoU=metrics["mIoU"], aAcc=metrics["aAcc"], mAcc=metrics["mAcc"],
                              IoU=list(metrics["IoU"]), iteration=int(meta.get("iteration", -1)),
                              params=sum(p.numel() for p in model.parameters()),
                              gflops=gflops(model, isr, pool))
        rows.append(dict(table=name, label=label, run=run, isr=isr or get_isr(model), pool=pool, **cache[key]))
        timed[label] = (model, isr, pool)
    if latency_runs and timed:
        x = torch.randn(1, 3, *SIZE)

        def forward(model, isr, pool):
            def fn():
                with torch.inference_mode(), edaformer.isr(model, isr or get_isr(model),
                                                           pool=pool if pool != "avg" else None):
                    model(x)
            return fn

        timings = bench.time_interleaved({k: forward(*v) for k, v in timed.items()}, runs=latency_runs, warmup=1)
        for row in rows:
            row["ms"] = 1000 * timings[row["label"]].median
    return rows


def markdown(rows: list[dict]) -> str:
    has_ms = any("ms" in r for r in rows)
    head = "| row | run (iterations) | ISR | params (M) | GFLOPs 360x480 | " + ("ms | " if has_ms else "") + "mIoU | aAcc |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms = f" {r['ms']:.0f} |" if has_ms else ""
        out.append(f"| {r['label']} | {r['run']} ({r['iteration']}) | {r['isr']} | {r['params'] / 1e6:.2f} | "
                   f"{r['gflops']:.2f} |{ms} {100 * r['mIoU']:.2f} | {100 * r['aAcc']:.2f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for r in rows:
        ax.scatter(r["gflops"], 100 * r["mIoU"], s=30)
        ax.annotate(r["label"], (r["gflops"], 100 * r["mIoU"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("GFLOPs at 360x480")
    ax.set_ylabel("CamVid val mIoU (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


TITLES = {"3b": "Decoder structure (EFA blocks at c4-c3-c2)", "5a": "ISR at inference vs trained reduced",
          "6a": "ISR key/value pooling kind", "7": "ISR on SegFormer-B0 and EDAFormer-T (encoder factors)",
          "4": "Fine-tuning at raised ratios"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, type=Path, help="folder holding the study runs' work dirs")
    p.add_argument("--out", required=True, type=Path, help="folder for studies.json, tables.md and PNGs")
    p.add_argument("--tables", nargs="*", default=list(TABLES), choices=list(TABLES))
    p.add_argument("--latency-runs", type=int, default=5, help="timed forwards per row (0: no latency)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / "studies.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    report = [f"Machine: {bench.environment()}; {args.threads} thread(s); latency: median of "
              f"{args.latency_runs} round-robin forwards at 360x480, batch 1."]
    for name in args.tables:
        rows = score_table(name, args.runs, cache, args.latency_runs)
        cache_path.write_text(json.dumps(cache, indent=1))
        if not rows:
            continue
        table = markdown(rows)
        print(f"\nTable {name}: {TITLES[name]}\n{table}")
        report.append(f"## Table {name}: {TITLES[name]}\n\n{table}")
        (args.out / f"table{name}.json").write_text(json.dumps(rows, indent=1))
        plot(rows, args.out / f"table{name}.png", f"CamVid: {TITLES[name]}")
    (args.out / "tables.md").write_text("\n\n".join(report) + "\n")
    print(f"wrote {args.out / 'tables.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
