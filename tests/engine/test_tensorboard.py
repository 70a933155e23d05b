"""``train.tensorboard``: the log records as TensorBoard scalars, continued without repeats on
resume, and a one-line error without the tensorboard package."""
import json
import subprocess
import sys

import pytest

from edaformer.cli import main as cli_main
from edaformer.config import load_config
from edaformer.engine import train
from tests.helpers.training_data import CLASSES, make_dataset, subprocess_env, write_config


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in ``log_dir`` as (step, value) points, after TensorBoard's purges."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _records(work):
    lines = (work / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r for r in records if r.get("mode") != "val"], [r for r in records if r.get("mode") == "val"]


@pytest.fixture()
def tb_config(tmp_path):
    pytest.importorskip("tensorboard", reason="train.tensorboard needs the tensorboard package")
    data = make_dataset(tmp_path / "data", n=2)
    return write_config(tmp_path / "tb.yaml", data, train={"tensorboard": True})


def test_scalars_match_log_jsonl(tb_config, tmp_path):
    work = tmp_path / "work"
    train(load_config(tb_config, ["schedule.iters=2"]), work, device="cpu")
    scalars = _scalars(work / "tensorboard")
    train_log, val_log = _records(work)
    assert [r["iter"] for r in train_log] == [1, 2] and len(val_log) == 1
    for key in ("loss", "lr", "time", "data_time", "memory_mb"):
        steps, values = zip(*scalars[f"train/{key}"])
        assert steps == (1, 2)
        assert values == pytest.approx([r[key] for r in train_log], rel=1e-6)  # stored as float32
    for key in ("mIoU", "aAcc", "mAcc", "mDice"):
        assert scalars[f"val/{key}"] == [(2, pytest.approx(val_log[0][key], rel=1e-6))]
    per_class = {tag.split("/", 2)[2] for tag in scalars if tag.startswith("val/IoU/")}
    assert per_class == set(CLASSES)


def test_resume_continues_without_repeated_points(tb_config, tmp_path):
    work = tmp_path / "work"
    cfg = load_config(tb_config, ["schedule.iters=3"])
    train(cfg, work, device="cpu")                                   # checkpoints at 2 and 3, points 1..3
    train(cfg, work, resume=str(work / "iter_2.pth"), device="cpu")  # runs 3 again: its points replace the first
    losses = _scalars(work / "tensorboard")["train/loss"]
    train_log, _ = _records(work)
    assert [step for step, _ in losses] == [1, 2, 3] == [r["iter"] for r in train_log]
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in train_log], rel=1e-6)
    assert len(list((work / "tensorboard").iterdir())) == 2  # one event file per run


def test_missing_tensorboard_is_one_line_at_start(tmp_path, capsys, monkeypatch):
    data = make_dataset(tmp_path / "data", n=2)
    cfg_path = write_config(tmp_path / "tb.yaml", data)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    work = tmp_path / "work"
    assert cli_main(["train", str(cfg_path), "--work-dir", str(work), "--device", "cpu",
                     "--set", "train.tensorboard=true"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "edaformer train: error: train.tensorboard needs the tensorboard package: pip install tensorboard")
    assert not work.exists()  # before any work


@pytest.mark.slow
def test_the_package_imports_without_tensorboard():
    code = ("import sys; sys.modules['tensorboard'] = sys.modules['torch.utils.tensorboard'] = None\n"
            "import edaformer.cli, edaformer.engine.train, edaformer.engine.tensorboard; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
