"""``edaformer bench``: the table, the JSON report of an ISR sweep and a checkpoint's class count."""
import json

import pytest
import torch

from edaformer.cli import main
from tests.helpers.checkpoints import random_checkpoint

NAME = "edaformer-t-ade20k"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_table(capsys):
    assert main(["bench", NAME, "--size", "64", "64", "--isr", "2211-222", "--runs", "2", "--warmup", "0"]) == 0
    text = capsys.readouterr().out
    assert "| ISR |" in text and "| 2211-222 |" in text


def test_bench_json_isr_sweep(capsys):
    assert main(["bench", NAME, "--size", "64", "64", "--isr-sweep", "--runs", "1", "--warmup", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["isr"] for r in report["rows"]] == ["1111-111", "1111-222", "2211-222", "2222-222"]
    assert report["environment"]["torch"] == torch.__version__


def test_bench_takes_the_checkpoint_class_count(tmp_path, capsys):
    _, ckpt = random_checkpoint(tmp_path / "seven.pth", NAME, num_classes=7)
    assert main(["bench", NAME, "--size", "64", "64", "--checkpoint", str(ckpt), "--runs", "1", "--warmup", "0",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == NAME and len(report["rows"]) == 1
