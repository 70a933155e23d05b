"""benchmarks/harness.py: peak memory in a child process, builders, report output."""
import json
import sys

import pytest
import torch

from edaformer.models import fastpath
from tests.helpers.reference import load_benchmark_module

harness = load_benchmark_module("harness")


def test_build_named_is_seeded():
    a = harness.build_named("edaformer-t-ade20k", isr="2211-222", num_classes=3, seed=1)
    b = harness.build_named("edaformer-t-ade20k", num_classes=3, seed=1)
    assert str(a.isr) == "2211-222" and not a.training
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_emit_report_prints_and_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    harness.emit_report({"x": float("nan"), "rows": (1, 2)}, "the table", str(path))
    assert capsys.readouterr().out.strip() == "the table"
    assert json.loads(path.read_text()) == {"x": None, "rows": [1, 2]}
    harness.emit_report({"a": 1}, "the table", "-")
    assert json.loads(capsys.readouterr().out) == {"a": 1}


def test_measure_peak_rss_sees_a_large_allocation():
    result = harness.measure_peak_rss(lambda: torch.ones(64 << 20, dtype=torch.uint8))
    if sys.platform == "linux":  # the peak mark can be reset through /proc
        assert result["exact"]
    assert result["peak_bytes"] >= (48 << 20)


def test_inference_peak_memory_applies_fastpath_options(monkeypatch):
    seen = []
    monkeypatch.setattr(harness, "_inference_peak_memory", lambda *a: seen.append(fastpath.get_options()) or {})
    harness.inference_peak_memory("harness:build_named", {}, 1, (64, 64), fastpath_options={"ffn_band_tokens": None})
    assert seen == [fastpath.FastPathOptions(ffn_band_tokens=None)]
    assert fastpath.get_options() == fastpath.FastPathOptions()


def test_run_in_child_reports_errors():
    result = harness.run_in_child("harness:build_named", {"name": "edaformer-x"}, timeout=120)
    assert result["ok"] is False and "unknown model 'edaformer-x'" in result["error"]


@pytest.mark.slow
def test_peak_memory_in_child_process():
    result = harness.peak_memory_cpu_child("harness:build_named", {"name": "edaformer-t-ade20k"},
                                           1, (256, 256), threads=1, timeout=300)
    assert result["ok"], result
    # at least the 150 x 256 x 256 float32 output
    assert result["peak_bytes"] >= 150 * 256 * 256 * 4
