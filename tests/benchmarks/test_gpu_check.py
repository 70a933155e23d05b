"""benchmarks/gpu_check.py: the no-CUDA message, and a CPU dry run of every section (--quick)."""
import json

import pytest
import torch

from tests.helpers.reference import load_benchmark_module


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark_module("gpu_check")


def test_without_cuda_says_so_and_exits_0(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]


def test_cpu_quick_ddp_and_inference(gpu_check, tmp_path, capsys, one_thread):
    path = tmp_path / "check.json"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--models", "t", "--dtypes", "fp32", "--sections",
                         "ddp,inference", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "## DDP start" in out and "## Inference: ours vs the reference-style forward" in out
    assert "| gloo | 1 |" in out and "3 ok, 0 failed, 0 skipped" in out
    rows = json.loads(path.read_text())["rows"]
    inference = [r for r in rows if r["section"] == "inference"]
    assert [r["isr"] for r in inference] == ["1111-111", "2211-222"]
    assert all(r["ours_ms"] > 0 and r["ratio"] > 0 for r in inference)


def test_failures_and_budget_are_rows(gpu_check, capsys, one_thread):
    rc = gpu_check.main(["--device", "cpu", "--quick", "--models", "t", "--dtypes", "fp32", "--sections",
                         "inference", "--isr", "bogus", "--runs", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert rc == 1 and "| failed | ValueError: ISR spec 'bogus'" in out and "0 ok, 1 failed" in out
    rc = gpu_check.main(["--device", "cpu", "--quick", "--budget-s", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "0 ok, 0 failed" in out and "--budget-s 0 spent" in out


@pytest.mark.slow
def test_cpu_quick_training_and_compile(gpu_check, tmp_path, capsys, one_thread):
    path = tmp_path / "check.json"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--sections", "train,compile", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "## Mixed-precision training" in out and "## torch.compile vs eager" in out
    rows = json.loads(path.read_text())["rows"]
    train = [r for r in rows if r["section"] == "train"]
    assert [(r["dtype"], r["scaler"]) for r in train] == [("bf16", False), ("fp16", True)]
    assert all(r["fell"] and r["last_loss"] < r["first_loss"] for r in train)
    (comp,) = [r for r in rows if r["section"] == "compile"]
    assert comp["status"] == "ok" and comp["backend"] == "eager" and comp["max_abs_diff"] < 1e-4
