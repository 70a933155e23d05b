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


def test_sweep_png(tmp_path, monkeypatch):
    """mIoU (%) against GFLOPs, each point labelled with its setting; without GFLOPs, against the setting."""
    import edaformer.plotting as plotting

    drawn, save = [], plotting._save
    monkeypatch.setattr(plotting, "_save", lambda fig, path: drawn.append(fig.axes[0]) or save(fig, path))
    rows = [dict(isr="1111-111", gflops=5.6, mIoU=0.42), dict(isr="2211-222", gflops=4.7, mIoU=0.41)]
    png = plot_sweep(rows, tmp_path / "sweep.png", title="t")
    assert Image.open(png).format == "PNG"
    ax = drawn[-1]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [5.6, 4.7] and list(line.get_ydata()) == pytest.approx([42.0, 41.0])
    assert [t.get_text() for t in ax.texts] == ["1111-111", "2211-222"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("GFLOPs", "mIoU (%)", "t")
    plot_sweep([dict(r, gflops=None) for r in rows], tmp_path / "sweep2.png")
    assert drawn[-1].get_xlabel() == "ISR setting"
    assert [t.get_text() for t in drawn[-1].get_xticklabels()] == ["1111-111", "2211-222"]


def test_confusion_png_cell_text_up_to_30_classes(tmp_path, monkeypatch):
    import numpy as np

    import edaformer.plotting as plotting

    cells, save = [], plotting._save
    monkeypatch.setattr(plotting, "_save", lambda fig, path: cells.append(
        [t.get_text() for t in fig.axes[0].texts]) or save(fig, path))
    counts = [[3, 1, 0], [0, 0, 0], [2, 0, 2]]  # class 1 is absent from the labels: a grey row, no numbers
    png = plotting.plot_confusion(counts, tmp_path / "c3.png", ["road", "sky", "car"])
    assert Image.open(png).format == "PNG"
    assert cells[-1] == ["75", "25", "0", "50", "0", "50"]  # row-normalised percentages, row by row
    big = np.eye(40, dtype=int) * 10 + 1
    png = plotting.plot_confusion(big, tmp_path / "c40.png", [f"class {i}" for i in range(40)])
    assert cells[-1] == [] and Image.open(png).size[0] > Image.open(tmp_path / "c3.png").size[0]
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        plotting.plot_confusion(counts, tmp_path / "x.png", ["a", "b"])
    with pytest.raises(ValueError, match="square"):
        plotting.plot_confusion([[1, 2]], tmp_path / "x.png")
