"""``edaformer eval``: metrics, saved predictions (equal to ``predict``'s), the ISR sweep."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import edaformer
from edaformer.cli import main as cli_main
from edaformer.config import load_config
from edaformer.inference import TestProtocol

from tests.helpers import training_data
from tests.helpers.training_data import CLASSES, DEFAULT_YAML
MODEL = "edaformer-t-ade20k"




def make_dataset(root: Path, sizes=((64, 64), (64, 64)), seed: int = 0) -> Path:
    """Coloured blocks (one image per size), the same images in both splits."""
    return training_data.make_dataset(root, seed=seed, sizes=sizes)


def write_config(path: Path, data_root: Path, scale=(64, 64), **data) -> Path:
    cfg = {"_base_": str(DEFAULT_YAML),
           "model": {"name": MODEL, "num_classes": 4},
           "data": {"type": "folder", "root": str(data_root), "classes": CLASSES, "img_suffix": ".png",
                    "scale": list(scale), "crop_size": [64, 64], "batch_size": 2, "workers": 0, **data},
           "schedule": {"iters": 1}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def eval_setup(tmp_path):
    data = make_dataset(tmp_path / "data")
    cfg_path = write_config(tmp_path / "e.yaml", data)
    torch.manual_seed(0)
    model = edaformer.create_model(MODEL, num_classes=4)
    ckpt = edaformer.save_checkpoint(model, tmp_path / "run" / "model.pth")
    return cfg_path, ckpt


def test_eval_cli_prints_metrics_and_class_table(eval_setup, capsys):
    cfg_path, ckpt = eval_setup
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu", "--isr", "2211-222"]) == 0
    out = capsys.readouterr().out
    assert "ISR 2211-222" in out and "aAcc" in out and "mIoU" in out and "mAcc" in out
    for name in CLASSES + ["| Class", "| mean"]:
        assert name in out
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu", "--mode", "slide",
                     "--set", "eval.crop_size=32"]) == 0
    out = capsys.readouterr().out
    assert "| mean" in out and "slide" in out and "window 32x32 stride 21x21" in out


def test_eval_and_predict_give_identical_labels(tmp_path, capsys):
    """Same checkpoint, same images: eval --save-predictions and predict write the same label PNGs."""
    data = make_dataset(tmp_path / "data", sizes=[(61, 97), (45, 30), (64, 64)])
    cfg_path = write_config(tmp_path / "e.yaml", data, scale=(96, 64))
    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    model = edaformer.create_model(MODEL, num_classes=4)
    protocol = TestProtocol.from_config(cfg)  # what `edaformer train` stores in the checkpoint
    ckpt = edaformer.save_checkpoint({"state_dict": model.state_dict(), "meta": {"test_protocol": protocol.to_dict(),
                                                                                 "CLASSES": CLASSES}},
                                     tmp_path / "ckpt.pth")
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu",
                     "--save-predictions", str(tmp_path / "eval")]) == 0
    assert "wrote 3 label map(s)" in capsys.readouterr().out
    assert cli_main(["predict", str(data / "images" / "val"), "--model", MODEL, "--checkpoint", str(ckpt),
                     "--device", "cpu", "--out", str(tmp_path / "pred")]) == 0
    names = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert names == ["0_label.png", "1_label.png", "2_label.png"]
    for name in names:
        a, b = Image.open(tmp_path / "eval" / name), Image.open(tmp_path / "pred" / name)
        assert a.mode == b.mode == "P" and a.size == b.size
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.getpalette()[:12] == b.getpalette()[:12]
    # and the labels are the model's prediction at the protocol's size (not at the spec's 2048x512)
    with torch.no_grad():
        img = torch.from_numpy(np.array(Image.open(data / "images" / "val" / "0.png"))).permute(2, 0, 1)
        x = edaformer.inference.preprocess(img, protocol)
    assert tuple(x.shape[-2:]) == (64, 96)


def test_eval_protocol_precedence(eval_setup, tmp_path, capsys):
    cfg_path, _ = eval_setup
    torch.manual_seed(0)
    model = edaformer.create_model(MODEL, num_classes=4)
    stored = TestProtocol(scale=(48, 48), divisor=16)
    ckpt = edaformer.save_checkpoint({"state_dict": model.state_dict(), "meta": {"test_protocol": stored.to_dict()}},
                                     tmp_path / "stored.pth")
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu"]) == 0
    assert "whole, fit 48x48, sides to multiples of 16" in capsys.readouterr().out     # checkpoint meta
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu", "--scale", "32", "32"]) == 0
    assert "fit 32x32" in capsys.readouterr().out                                     # command line


def test_isr_sweep_writes_json_and_plot_beside_the_checkpoint(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="the sweep plot needs matplotlib")
    data = make_dataset(tmp_path / "data", sizes=[(48, 60), (48, 60), (60, 48)])
    cfg_path = write_config(tmp_path / "work" / "run7" / "config.yaml", data, scale=(80, 60))
    torch.manual_seed(0)
    ckpt = edaformer.save_checkpoint(edaformer.create_model(MODEL, num_classes=4),
                                     tmp_path / "work" / "run7" / "best_mIoU.pth")
    titles = []
    from edaformer.cli import evaluate as eval_command

    plot = eval_command.plot_sweep  # what `edaformer eval` calls
    monkeypatch.setattr(eval_command, "plot_sweep", lambda rows, path, title="": titles.append(title) or plot(rows, path, title))
    monkeypatch.chdir(tmp_path)
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu", "--isr-sweep"]) == 0
    text = capsys.readouterr().out
    out_dir = tmp_path / "work" / "run7"                       # beside the checkpoint, not work_dirs/config
    assert not (tmp_path / "work_dirs").exists()
    result = json.loads((out_dir / "isr_sweep.json").read_text())
    rows = result["results"]
    assert [r["isr"] for r in rows] == ["1111-111", "1111-222", "2211-222", "2222-222"]
    assert rows[0]["delta_mIoU"] == 0.0 and all(0 <= r["mIoU"] <= 1 for r in rows)
    assert all(0 <= r[k] <= 1 for r in rows for k in ("mDice", "mPrec", "mRecall"))
    # the size the images run at: 48x60 fitted into (80, 60) is 60x75, sides to 32: 64x96 (2 of 3 images)
    assert result["meta"]["flops_input_size"] == [64, 96]
    assert "most common test size (2 of 3 images)" in result["meta"]["flops_input_size_source"]
    assert "GFLOPs @ 64x96" in text and "most common test size (2 of 3 images)" in text
    flops = [r["gflops"] for r in rows]
    assert flops[0] == pytest.approx(edaformer.count_flops(edaformer.create_model(MODEL, num_classes=4),
                                                           (64, 96)).gflops)
    assert flops == sorted(flops, reverse=True) and flops[0] > flops[-1]
    for r in rows:
        assert r["isr"] in text
    assert (out_dir / "isr_sweep.png").stat().st_size > 1000
    assert titles == ["run7/best_mIoU ISR sweep"]


def test_isr_sweep_without_matplotlib_says_so_once(eval_setup, tmp_path, capsys, caplog, monkeypatch):
    cfg_path, ckpt = eval_setup
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu", "--isr-sweep",
                     "1111-111", "--out", str(tmp_path / "sweep")]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err + caplog.text).count("matplotlib is not installed") == 1
    assert (tmp_path / "sweep" / "isr_sweep.json").is_file() and not (tmp_path / "sweep" / "isr_sweep.png").exists()


def test_training_stores_the_protocol_in_checkpoint_meta(tmp_path):
    from edaformer.checkpoint import read_checkpoint
    from edaformer.engine import train

    data = make_dataset(tmp_path / "data", sizes=[(32, 40)] * 2)
    cfg_path = write_config(tmp_path / "t.yaml", data, scale=(48, 40))
    cfg = load_config(cfg_path, ["schedule.warmup_iters=0", "train.checkpoint_interval=1", "train.eval_interval=1",
                                 "data.crop_size=[32,32]", "eval.mode=slide", "eval.crop_size=[32,32]"])
    train(cfg, tmp_path / "work", device="cpu")
    expected = TestProtocol.from_config(cfg)
    assert (expected.scale, expected.mode, expected.crop_size, expected.stride) == ((48, 40), "slide", (32, 32),
                                                                                     (21, 21))
    for name in ("iter_1.pth", "best_mIoU.pth"):
        meta = read_checkpoint(tmp_path / "work" / name)["meta"]
        assert TestProtocol.from_dict(meta["test_protocol"]) == expected
    seg = edaformer.Segmenter.from_checkpoint(MODEL, tmp_path / "work" / "best_mIoU.pth", device="cpu")
    assert seg.protocol == expected and seg.classes == tuple(CLASSES)


def test_eval_uses_the_checkpoint_stored_isr_and_pool_unless_given(eval_setup, tmp_path, capsys):
    from edaformer.checkpoint import read_checkpoint, save_checkpoint

    cfg_path, ckpt = eval_setup
    obj = read_checkpoint(ckpt)
    obj.setdefault("meta", {}).update(isr="2211-222", isr_pool="max")
    tuned = save_checkpoint(obj, tmp_path / "tuned.pth")
    base = ["eval", str(cfg_path), "--checkpoint", str(tuned), "--device", "cpu"]
    assert cli_main(base) == 0
    assert "ISR 2211-222 (max pooling)" in capsys.readouterr().out
    assert cli_main(base + ["--pool", "overlap"]) == 0
    assert "ISR 2211-222 (overlap pooling)" in capsys.readouterr().out
    assert cli_main(base + ["--isr", "1111-222"]) == 0
    assert "ISR 1111-222" in capsys.readouterr().out


def _label_pixels_per_class(data: Path) -> list[int]:
    counts = np.zeros(len(CLASSES), np.int64)
    for path in sorted((data / "annotations" / "val").iterdir()):
        label = np.asarray(Image.open(path)).ravel()
        counts += np.bincount(label[label != 255], minlength=len(CLASSES))
    return counts.tolist()


def test_eval_prints_dice_precision_recall(eval_setup, capsys):
    cfg_path, ckpt = eval_setup
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    summary = next(line for line in out.splitlines() if line.startswith("aAcc "))
    assert [part.split()[0] for part in summary.split("  ")] == ["aAcc", "mIoU", "mAcc", "mDice", "mPrec", "mRecall"]
    assert "| Class" in out and "Dice" in out and "Prec" in out and "Recall" in out


def test_eval_confusion_writes_counts_csv_and_png(tmp_path, capsys):
    import csv

    pytest.importorskip("matplotlib", reason="the confusion matrix plot needs matplotlib")
    data = make_dataset(tmp_path / "data")
    cfg_path = write_config(tmp_path / "e.yaml", data)
    torch.manual_seed(0)
    ckpt = edaformer.save_checkpoint(edaformer.create_model(MODEL, num_classes=4), tmp_path / "run" / "model.pth")
    png = tmp_path / "plots" / "confusion.png"
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu", "--confusion", str(png)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {png.with_suffix('.csv')}" in out and f"wrote {png}" in out
    image = Image.open(png)
    assert image.format == "PNG" and min(image.size) > 200
    with open(png.with_suffix(".csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == CLASSES and [r[0] for r in rows[1:]] == CLASSES
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert counts.sum(1).tolist() == _label_pixels_per_class(data)   # rows: ground truth, ignore left out
    summary = next(line for line in out.splitlines() if line.startswith("aAcc "))
    assert float(summary.split()[1]) == pytest.approx(100 * np.trace(counts) / counts.sum(), abs=0.005)


def test_eval_confusion_without_matplotlib_writes_the_counts(eval_setup, tmp_path, capsys, caplog, monkeypatch):
    cfg_path, ckpt = eval_setup
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    png = tmp_path / "confusion.png"
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu", "--confusion", str(png)]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err + caplog.text).count("matplotlib is not installed") == 1
    assert png.with_suffix(".csv").is_file() and not png.exists()


@pytest.mark.parametrize("extra, message", [
    (["--confusion", "c.jpg"], "--confusion takes a .png path, got c.jpg"),
    (["--confusion", "c.png", "--isr-sweep"], "--confusion is for a single evaluation, not with --isr-sweep"),
])
def test_eval_confusion_bad_use_is_one_line(eval_setup, capsys, extra, message):
    cfg_path, ckpt = eval_setup
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu", *extra]) == 2
    assert capsys.readouterr().err.strip() == f"edaformer eval: error: {message}"


def test_eval_checkpoint_with_another_class_count_is_one_line(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    cfg_path = write_config(tmp_path / "e.yaml", data)
    torch.manual_seed(0)
    ckpt = edaformer.save_checkpoint(edaformer.create_model(MODEL, num_classes=6), tmp_path / "six.pth")
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"edaformer eval: error: checkpoint {ckpt} has 6 classes but the config's dataset has 4 "
                   "(red, green, blue, yellow)")


def test_prepare_evaluation_loads_data_weights_and_protocol(eval_setup):
    from edaformer.data import LOADER_KEYS, dataset_config
    from edaformer.engine.prepare import evaluation_isr, prepare_evaluation

    cfg_path, ckpt = eval_setup
    cfg = load_config(cfg_path)
    assert not set(LOADER_KEYS) & set(dataset_config(cfg["data"])) and "root" in dataset_config(cfg["data"])
    ev = prepare_evaluation(cfg, ckpt, "cpu", mode="slide", tta=True)
    assert not ev.model.training and ev.model.num_classes == 4 and len(ev.dataset) == 2
    assert ev.report["format"] and ev.protocol.mode == "slide" and ev.protocol.flip
    assert ev.protocol.tta_scales == tuple(cfg["eval"]["tta_scales"])
    assert ev.protocol.scale == TestProtocol.from_config(cfg).scale  # the checkpoint stores none: the config's
    assert evaluation_isr("2211-222", None, {"isr": "2222-222", "isr_pool": "max"}) == ("2211-222", None)
    assert evaluation_isr(None, None, {"isr": "2222-222", "isr_pool": "max"}) == ("2222-222", "max")
    assert evaluation_isr(None, "avg", {"isr": "2222-222", "isr_pool": "max"}) == ("2222-222", "avg")
    assert evaluation_isr(None, None, {}) == (None, None)


def test_isr_tune_checkpoint_with_another_class_count_is_the_same_line(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    cfg_path = write_config(tmp_path / "e.yaml", data)
    ckpt = edaformer.save_checkpoint(edaformer.create_model(MODEL, num_classes=6), tmp_path / "six.pth")
    assert cli_main(["isr-tune", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu",
                     "--budget-gflops", "1"]) == 2
    assert capsys.readouterr().err.strip() == (f"edaformer isr-tune: error: checkpoint {ckpt} has 6 classes but the "
                                               "config's dataset has 4 (red, green, blue, yellow)")


def test_eval_caps_loader_workers_at_the_cpu_count_without_torch_warnings(eval_setup, capsys, caplog):
    import warnings

    cfg_path, ckpt = eval_setup
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu",
                         "--set", "data.workers=4096"]) == 0
    assert not [w for w in caught if "worker" in str(w.message)]
    assert sum("data.workers is 4096" in r.getMessage() for r in caplog.records) == 1
