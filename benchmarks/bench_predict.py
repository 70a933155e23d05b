"""Prediction benchmark: image -> label map, against the reference code's forward + argmax.

Three tables:

1. **Latency** of an 8-bit 512x512 image to its label map with a 150-class EDAFormer-T: ours
   (``Segmenter``: preprocessing, decoder logits resized and reduced in bands) vs the
   reference-style model's forward + ``argmax`` on the same weights and the same normalized
   input, and ours through the full-resolution logits (``infer_logits`` + ``argmax``, the
   previous path). Timed round-robin in one process (``edaformer.bench.time_interleaved``).
2. **Peak memory** (RSS growth, fresh child process per row) of the same at 19, 150 and 600 classes.
3. **A large photo** through ``edaformer predict`` in a child process with a 150-class model:
   peak RSS, wall time and exit status, for the code under ``--before-src`` (e.g. the main
   checkout's ``src``) and this checkout's.

    python benchmarks/bench_predict.py --threads 2 --runs 10
    python benchmarks/bench_predict.py --before-src /path/to/other/checkout/src --photo 8000x6000

Numbers from a shared machine: compare the ratios within one run, not the absolute times.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
MODEL = "edaformer-t-ade20k"


# -- children (no edaformer import at module level: the child picks the code through PYTHONPATH) ----
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child_memory(spec: dict) -> dict:
    """Peak RSS growth of one image -> labels at 512x512 (ours or the reference's)."""
    import gc

    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(HERE))
    import reference_style
    from harness import build_named
    from edaformer.inference import Segmenter, preprocess

    model = build_named(MODEL, num_classes=spec["classes"], seed=0).eval()
    img = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    small = img[:64, :64].copy()
    if spec["which"] == "ours":
        seg = Segmenter(model, device="cpu")
        run = lambda im: seg(im)  # noqa: E731
    else:
        base = reference_style.from_model(model).eval()

        def run(im):
            with torch.inference_mode():
                return base(preprocess(im, None)).argmax(1)
    run(small)  # one-time kernel state
    gc.collect()
    _reset_peak()
    before = _status_kb("VmRSS")
    out = run(img)
    peak = _status_kb("VmHWM")
    del out
    return dict(peak_mb=(peak - before) / 1024)


def _child_photo(spec: dict) -> dict:
    """``edaformer predict`` on one large photo: peak RSS and exit status."""
    import contextlib
    import io

    import torch

    torch.set_num_threads(spec["threads"])
    import edaformer
    from edaformer import cli

    err = io.StringIO()
    before = _status_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err):
            rc = cli.main(["predict", spec["image"], "--model", MODEL, "--checkpoint", spec["checkpoint"],
                           "--out", spec["out"], "--device", "cpu"])
        error = ""
    except BaseException as e:  # the previous code lets an allocation failure end the run
        rc, error = "uncaught", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    wall = time.perf_counter() - t0
    lines = [ln for ln in err.getvalue().replace("\r", "\n").splitlines() if "predict:" in ln and "%" not in ln]
    return dict(rc=rc, error=error or (lines[-1] if lines else ""), wall_s=wall,
                peak_mb=(_status_kb("VmHWM") - before) / 1024, peak_total_mb=_status_kb("VmHWM") / 1024,
                outputs=sorted(os.listdir(spec["out"])) if os.path.isdir(spec["out"]) else [],
                edaformer=str(Path(edaformer.__file__).parent))


def _run_child(kind: str, spec: dict, src: Path, timeout: float = 3600) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return dict(rc=proc.returncode, error=f"child failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the benchmark ---------------------------------------------------------------------------------
def latency(args) -> list[dict]:
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    import reference_style
    from edaformer import bench as bm
    from harness import build_named
    from edaformer.inference import Segmenter, infer_logits, preprocess

    model = build_named(MODEL, seed=0).eval()
    base = reference_style.from_model(model).eval()
    img = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    seg = Segmenter(model, device="cpu")
    x = preprocess(img, seg.protocol)
    assert tuple(x.shape[-2:]) == (512, 512)

    def reference():
        with torch.inference_mode():
            return base(x).argmax(1)

    fns = {"reference: forward + argmax": reference,
           "ours: image -> labels (Segmenter)": lambda: seg(img),
           "ours: full-resolution logits + argmax": lambda: infer_logits(model, x).argmax(1)}
    with torch.inference_mode():
        same = (seg(img) == reference()[0].numpy()).mean()
    timings = bm.time_interleaved(fns, runs=args.runs, warmup=args.warmup)
    ref = timings["reference: forward + argmax"].median
    return [dict(what=name, median_ms=1e3 * t.median, iqr_ms=1e3 * t.iqr, cpu_ms=1e3 * t.cpu_median,
                 vs_reference=t.median / ref, labels_equal_to_reference=float(same) if "Segmenter" in name else None)
            for name, t in timings.items()]


def memory(args) -> list[dict]:
    rows = []
    for classes in (19, 150, 600):
        for which in ("reference", "ours"):
            r = _run_child("memory", dict(classes=classes, which=which, threads=args.threads), SRC)
            rows.append(dict(classes=classes, what=which, **r))
    return rows


def photo(args) -> list[dict]:
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(SRC))
    import edaformer

    h, w = args.photo
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        coarse = rng.integers(0, 256, (h // 100 + 1, w // 100 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
        image.save(tmp / "photo.jpg", quality=90)
        del image
        ckpt = edaformer.save_checkpoint(edaformer.create_model(MODEL), tmp / "model.pth")
        for label, src in (("before", args.before_src), ("after", SRC)):
            if src is None:
                continue
            out = tmp / f"out_{label}"
            spec = dict(image=str(tmp / "photo.jpg"), checkpoint=str(ckpt), out=str(out), threads=args.threads)
            rows.append(dict(code=label, src=str(src), **_run_child("photo", spec, Path(src))))
    return rows


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = " | ".join(title for _, title, _ in cols)
    lines = [f"| {head} |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("" if v is None else (format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--photo", type=lambda t: tuple(int(v) for v in t.lower().split("x")), default=(6000, 8000),
                   metavar="HxW", help="large photo size (default 6000x8000: an 8000x6000 landscape photo)")
    p.add_argument("--before-src", type=Path, default=None, help="src folder of the code to compare with")
    p.add_argument("--skip", nargs="*", default=[], choices=["latency", "memory", "photo"])
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, spec = args.child
        print(json.dumps({"memory": _child_memory, "photo": _child_photo}[kind](json.loads(spec))))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(SRC))
    from edaformer.bench import environment

    env = environment()
    result = dict(environment=env, threads=args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU(s); {MODEL} (150 classes "
          "unless stated), random weights (seed 0)")
    if "latency" not in args.skip:
        result["latency"] = latency(args)
        print(f"\n512x512 uint8 image -> label map, {args.runs} runs after {args.warmup} warm-up, interleaved")
        print(_table(result["latency"], [("what", "path", ""), ("median_ms", "median ms", ".1f"),
                                         ("iqr_ms", "IQR ms", ".1f"), ("cpu_ms", "CPU ms", ".0f"),
                                         ("vs_reference", "time vs reference", ".2f"),
                                         ("labels_equal_to_reference", "labels = reference", ".4f")]))
    if "memory" not in args.skip:
        result["memory"] = memory(args)
        print("\nPeak RSS growth of one 512x512 image -> labels (fresh child process per row)")
        print(_table(result["memory"], [("classes", "classes", ""), ("what", "path", ""),
                                        ("peak_mb", "peak MB", ".0f"), ("error", "error", "")]))
    if "photo" not in args.skip:
        result["photo"] = photo(args)
        print(f"\n`edaformer predict` on a {args.photo[1]}x{args.photo[0]} JPEG (W x H), 150 classes, child process")
        print(_table(result["photo"], [("code", "code", ""), ("rc", "exit", ""), ("wall_s", "wall s", ".1f"),
                                       ("peak_mb", "peak RSS growth MB", ".0f"),
                                       ("peak_total_mb", "peak RSS MB", ".0f"), ("error", "error", "")]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
