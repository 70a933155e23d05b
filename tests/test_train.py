"""The eval CLI, on tiny folder datasets built in tmp_path."""
import json

import pytest
import torch

import edaformer
from edaformer.cli import main as cli_main
from edaformer.config import load_config
from training_data import CLASSES, DEFAULT_YAML, REPO, make_dataset, write_config


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast on a shared 2-core machine and the same math in every process."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- eval CLI --------------------------------------------------------------------------------------
@pytest.fixture()
def eval_setup(tmp_path):
    data = make_dataset(tmp_path / "data", n=2, size=64)
    cfg_path = write_config(tmp_path / "e.yaml", data, size=64)
    torch.manual_seed(0)
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=4)
    ckpt = edaformer.save_checkpoint(model, tmp_path / "model.pth")
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
    assert "| mean" in capsys.readouterr().out


def test_isr_sweep_writes_json_and_plot(eval_setup, tmp_path, capsys):
    cfg_path, ckpt = eval_setup
    out_dir = tmp_path / "sweep"
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu", "--isr-sweep",
                     "--out", str(out_dir)]) == 0
    text = capsys.readouterr().out
    result = json.loads((out_dir / "isr_sweep.json").read_text())
    rows = result["results"]
    assert [r["isr"] for r in rows] == ["1111-111", "1111-222", "2211-222", "2222-222"]
    assert rows[0]["delta_mIoU"] == 0.0 and all(0 <= r["mIoU"] <= 1 for r in rows)
    assert result["meta"]["flops_input_size"] == [64, 64]
    flops = [r["gflops"] for r in rows]
    if all(f is not None for f in flops):                       # edaformer.flops present
        assert flops == sorted(flops, reverse=True) and flops[0] > flops[-1]
    for r in rows:
        assert r["isr"] in text
    assert (out_dir / "isr_sweep.png").stat().st_size > 1000
