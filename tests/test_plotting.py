"""PNG plots of training logs and ISR sweeps."""
import json

import pytest
from PIL import Image

from edaformer.plotting import plot_sweep, plot_training_log, read_log

pytest.importorskip("matplotlib")


def test_training_curves_png(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [dict(iter=i, loss=2.0 / i, lr=1e-4, time=0.1) for i in range(1, 11)]
    records += [dict(iter=5, mode="val", mIoU=0.3, aAcc=0.5, mAcc=0.4), dict(iter=10, mode="val", mIoU=0.4)]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    train, val = read_log(log)
    assert len(train) == 10 and [r["iter"] for r in val] == [5, 10]
    png = plot_training_log(log, tmp_path / "curves.png", title="t")
    assert Image.open(png).format == "PNG"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no training records"):
        plot_training_log(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_sweep_png(tmp_path):
    rows = [dict(isr="1111-111", gflops=5.6, mIoU=0.42), dict(isr="2211-222", gflops=4.7, mIoU=0.41)]
    assert Image.open(plot_sweep(rows, tmp_path / "sweep.png")).size[0] > 100
