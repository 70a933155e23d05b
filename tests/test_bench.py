"""edaformer.bench: timing statistics, interleaving, tables, JSON and the ISR sweep."""
import json
import math

import pytest
import torch

import edaformer
from edaformer import bench


@pytest.fixture(scope="module")
def model_t():
    torch.manual_seed(0)
    return edaformer.create_model("edaformer-t-ade20k").eval()


def test_timing_statistics():
    t = bench.Timing([0.4, 0.1, 0.3, 0.2], [0.1] * 4)
    assert t.median == pytest.approx(0.25) and t.min == 0.1 and t.max == 0.4
    assert t.q1 == pytest.approx(0.175) and t.q3 == pytest.approx(0.325)
    s = t.summary(batch=2)
    assert s["images_per_s"] == pytest.approx(8.0) and s["runs"] == 4


def test_time_interleaved_calls_each_once_per_round():
    calls = []
    out = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=3,
                                 warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert len(out["a"].wall) == len(out["b"].wall) == 3


def test_time_interleaved_checks_arguments():
    with pytest.raises(ValueError, match="runs must be >= 1"):
        bench.time_interleaved({"a": lambda: None}, runs=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            bench.time_callable(lambda: None, runs=1, device="cuda")


def test_format_table():
    table = bench.format_table([{"a": 1.23456, "b": None}], [("a", "A", ".2f"), ("b", "B", "")])
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1.23 | - |"]


def test_to_jsonable():
    value = bench.to_jsonable({1: (bench.Timing([0.5]), math.nan, math.inf)})
    assert value == {"1": [{"wall": [0.5], "cpu": []}, None, None]}
    json.dumps(value)


def test_environment_names_torch_and_threads():
    env = bench.environment()
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        bench.resolve_dtype("fp8")


def test_run_isr_sweep_restores_isr(model_t):
    rows = bench.run_isr_sweep(model_t, (64, 64), ["1111-111", "2211-222"], runs=1, warmup=0)
    assert [r["isr"] for r in rows] == ["1111-111", "2211-222"]
    assert all(r["median_ms"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert rows[1]["gflops"] < rows[0]["gflops"]
    assert str(model_t.isr) == "1111-111"


def test_run_isr_sweep_restores_the_pool_kind():
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=3).eval()
    model.set_isr("1111-222", pool="max")
    rows = bench.run_isr_sweep(model, (64, 64), ["2211-222"], runs=1, warmup=0, pool="merge")
    assert rows[0]["isr"] == "2211-222"
    assert (str(model.isr), model.isr_pool) == ("1111-222", "max")


def test_run_isr_sweep_rejects_a_setting_too_large_for_the_input(model_t):
    with pytest.raises(ValueError, match="pooling ratio"):
        bench.run_isr_sweep(model_t, (64, 64), ["1111-111", "4444-444"], runs=1, warmup=0)
    assert str(model_t.isr) == "1111-111"


def test_autocast_context_is_full_precision_for_none_and_fp32():
    """``torch.autocast`` would read ``dtype=None`` as its device's default (bf16 on CPU)."""
    from edaformer.bench import autocast_context

    for dtype in (None, torch.float32):
        with autocast_context(torch.device("cpu"), dtype):
            assert not torch.is_autocast_enabled("cpu")
    with autocast_context(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
