"""int8 ONNX Runtime benchmark: static quantization of an exported model, time and mIoU against fp32.

The fp32 file is ``--onnx`` or the export of ``--checkpoint`` (``edaformer export``: the stored ISR
setting and test protocol, fixed at the test size of the first labelled image; default the shipped
``edaformer-t-camvid``). ONNX Runtime's static quantization (``quantize_static``, QDQ format,
per-channel weights, MinMax calibration) turns it into an int8 file, calibrated on ``--calib-images``
images of ``--calib`` preprocessed as at test time; the int8 file keeps the fp32 file's metadata,
so both run through ``Segmenter.from_onnx`` (same preprocessing, banded resize + argmax).

Table, one row per file: size on disk, median / IQR time of one image -> label map (``--threads``
intra-op threads, one process, interleaved), the time relative to fp32, the mIoU on the labelled
folder (``--images`` / ``--labels``: ``<stem>.png`` class ids, ``--ignore-index`` ignored; default
CamVid val) and the share of pixels whose label equals the fp32 file's.

    python benchmarks/bench_int8.py --calib /data/camvid/images/train --images /data/camvid/images/val \\
        --labels /data/camvid/annotations/val --threads 2 --runs 10
    python benchmarks/bench_int8.py --limit 2 --calib-images 2 --runs 1 --warmup 0     # a quick check

Numbers from a shared machine: compare the ratios within one run, not the absolute times.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path[:0] = [str(HERE), str(SRC)]  # harness; this checkout's edaformer
CAMVID = HERE.parent.parent / "shared" / "datasets" / "camvid"  # ../shared beside the repository
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def _images(folder: Path, limit: int | None) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no images in {folder}")
    return files[:limit] if limit else files


def _calibration_reader(files, protocol, input_name: str):
    """A ``CalibrationDataReader`` over ``files``, each preprocessed as the test protocol says."""
    from onnxruntime.quantization import CalibrationDataReader  # the onnx extras

    from edaformer.inference import preprocess

    class Images(CalibrationDataReader):
        def __init__(self):
            self.files = iter(files)

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else {input_name: preprocess(path, protocol).numpy()}

    return Images()


class _RankOneNotes(logging.Filter):
    """Counts and hides the quantizer's note for each 1-D weight (norm scales, biases), which has no
    channel axis and is quantized per tensor."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "is out-of-range for weight" in record.getMessage():
            self.count += 1
            return False
        return True


def quantize(fp32: Path, int8: Path, calib: list[Path], protocol) -> Path:
    """``fp32`` quantized to int8 (QDQ, per-channel) into ``int8``, with the fp32 file's metadata."""
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8.with_name(int8.stem + "_prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    source = onnx.load(str(fp32))
    reader = _calibration_reader(calib, protocol, source.graph.input[0].name)
    notes = _RankOneNotes()
    logging.getLogger().addFilter(notes)  # the quantizer logs on the root logger
    try:
        quantize_static(str(prepared), str(int8), reader, quant_format=QuantFormat.QDQ, per_channel=True)
    finally:
        logging.getLogger().removeFilter(notes)
    if notes.count:
        print(f"{notes.count} 1-D weights (no channel axis) quantized per tensor", file=sys.stderr)
    model = onnx.load(str(int8))
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    onnx.save(model, str(int8))
    prepared.unlink(missing_ok=True)
    return int8


def run(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from edaformer import bench as bm
    from edaformer.cli import main as cli_main
    from edaformer.inference import Segmenter, load_image
    from edaformer.metrics import SegMetric

    torch.set_num_threads(args.threads)
    labelled = [(p, args.labels / f"{p.stem}.png") for p in _images(args.images, args.limit)]
    missing = [str(label) for _, label in labelled if not label.is_file()]
    if missing:
        raise SystemExit(f"no label file for {len(missing)} image(s), e.g. {missing[0]}")
    calib = _images(args.calib, args.calib_images)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = args.onnx
        if fp32 is None:
            probe = Segmenter.from_checkpoint(None, args.checkpoint, device="cpu")
            h, w = probe.protocol.input_size(*load_image(labelled[0][0]).size[::-1])
            fp32 = tmp / "fp32.onnx"
            if cli_main(["export", "--checkpoint", args.checkpoint, "--size", str(h), str(w), "--out", str(fp32)]):
                raise SystemExit("export failed")
        segs = {"fp32": Segmenter.from_onnx(fp32, device="cpu", threads=args.threads)}
        int8 = quantize(Path(fp32), tmp / "int8.onnx", calib, segs["fp32"].protocol)
        segs["int8"] = Segmenter.from_onnx(int8, device="cpu", threads=args.threads)
        files = {"fp32": Path(fp32), "int8": int8}
        num_classes = segs["fp32"].num_classes
        metrics = {k: SegMetric(num_classes, ignore_index=args.ignore_index) for k in segs}
        same, total = 0, 0
        for image_path, label_path in labelled:
            image = load_image(image_path)
            label = torch.from_numpy(np.asarray(Image.open(label_path)).astype(np.int64))
            preds = {k: seg(image) for k, seg in segs.items()}
            for k, pred in preds.items():
                metrics[k].update(torch.from_numpy(pred.astype(np.int64)), label)
            same += int((preds["int8"] == preds["fp32"]).sum())
            total += preds["fp32"].size
        first = load_image(labelled[0][0])
        timings = bm.time_interleaved({k: (lambda s=seg: s(first)) for k, seg in segs.items()}, runs=args.runs,
                                      warmup=args.warmup)
        sizes = {k: f.stat().st_size for k, f in files.items()}
    base = timings["fp32"].median
    rows = []
    for k in segs:
        scores = metrics[k].compute()
        rows.append(dict(file=k, size_mb=sizes[k] / 2 ** 20, median_ms=1e3 * timings[k].median,
                         iqr_ms=1e3 * timings[k].iqr, vs_fp32=timings[k].median / base, mIoU=100 * scores["mIoU"],
                         labels_equal_fp32=1.0 if k == "fp32" else same / total))
    return dict(model=segs["fp32"].model.name, isr=str(segs["fp32"].model.isr), images=len(labelled),
                calibration_images=len(calib), threads=args.threads, runs=args.runs, warmup=args.warmup,
                environment=bm.environment(), rows=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", type=Path, default=None, help="an exported fp32 file (default: export --checkpoint)")
    p.add_argument("--checkpoint", default="edaformer-t-camvid", help="weights to export (default: the shipped "
                   "edaformer-t-camvid)")
    p.add_argument("--calib", type=Path, default=CAMVID / "images" / "train", help="calibration image folder")
    p.add_argument("--calib-images", type=int, default=32, help="calibration images (default 32)")
    p.add_argument("--images", type=Path, default=CAMVID / "images" / "val", help="labelled image folder")
    p.add_argument("--labels", type=Path, default=CAMVID / "annotations" / "val",
                   help="label folder: <stem>.png class ids per image")
    p.add_argument("--ignore-index", type=int, default=11, help="label value ignored (default 11, CamVid's void)")
    p.add_argument("--limit", type=int, default=None, help="use the first N labelled images")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results as JSON to this path ('-': only JSON)")
    args = p.parse_args(argv)

    from edaformer.bench import format_table
    from harness import emit_report

    result = run(args)
    text = (f"{result['model']}, ISR {result['isr']}: fp32 vs int8 (static QDQ, per-channel, "
            f"{result['calibration_images']} calibration images); mIoU on {result['images']} labelled image(s); "
            f"{args.threads} thread(s), {os.cpu_count()} CPU(s), {args.runs} runs after {args.warmup} warm-up, "
            "interleaved\n")
    text += format_table(result["rows"], [("file", "file", ""), ("size_mb", "MB", ".1f"),
                                          ("median_ms", "median ms", ".1f"), ("iqr_ms", "IQR ms", ".1f"),
                                          ("vs_fp32", "time vs fp32", ".2f"), ("mIoU", "mIoU %", ".2f"),
                                          ("labels_equal_fp32", "labels = fp32", ".4f")])
    emit_report(result, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
