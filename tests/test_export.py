"""ONNX export: onnxruntime agrees with PyTorch, fixed and dynamic input sizes, ISR baked in, metadata."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

import edaformer  # noqa: E402
from edaformer.cli import main  # noqa: E402
from edaformer.data import MEAN, STD  # noqa: E402
from edaformer.export import export_onnx, min_input_side, onnx_metadata, verify_onnx  # noqa: E402

NAME = "edaformer-t-ade20k"
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return edaformer.create_model(NAME).eval()


def _input_dims(path):
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


@pytest.mark.slow
def test_cli_export_fixed_size_matches_onnxruntime(model, tmp_path):
    ckpt = edaformer.save_checkpoint(model, tmp_path / "t.pth")
    out = tmp_path / "t.onnx"
    assert main(["export", NAME, "--checkpoint", str(ckpt), "--isr", "2211-222", "--size", "128", "128",
                 "--out", str(out)]) == 0
    assert _input_dims(out) == [1, 3, 128, 128]
    (result,) = verify_onnx(model, out, [(128, 128)], isr="2211-222")
    assert result["max_abs_diff"] <= TOL
    assert str(model.isr) == "1111-111"  # the model's own ISR setting is untouched


def test_export_rejects_a_size_the_isr_does_not_fit(model, tmp_path):
    with pytest.raises(ValueError, match=r"encoder stage 1.*pooling ratio 16"):
        export_onnx(model, tmp_path / "x.onnx", size=(48, 48), isr="2222-222")
    assert not (tmp_path / "x.onnx").exists()


def test_min_input_side(model):
    with edaformer.isr(model, "1111-111"):
        assert min_input_side(model, 0) == 29 and min_input_side(model, 1) == 29
    with edaformer.isr(model, "2222-222"):
        side = min_input_side(model, 0)
        model.check_input_size(side, side)
        with pytest.raises(ValueError):
            model.check_input_size(side - 1, side)


def _metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.slow
def test_cli_dynamic_export_is_quiet_carries_metadata_and_runs_any_batch_and_size(tmp_path):
    """The one dynamic export of the suite (the slowest export): quiet, its metadata, ISR baked in, any
    batch and size within the ISR's limits."""
    torch.manual_seed(1)
    seven = edaformer.create_model(NAME, num_classes=7).eval()
    names, colours = [f"c{i}" for i in range(7)], [[i, 2 * i, 3 * i] for i in range(7)]
    ckpt = edaformer.export_reference(seven, tmp_path / "seven.pth", meta={"CLASSES": names, "PALETTE": colours})
    out = tmp_path / "seven.onnx"
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(src),
                                                                                       os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "edaformer", "export", NAME, "--checkpoint", str(ckpt), "--size", "128",
                          "128", "--isr", "1111-222", "--dynamic", "--out", str(out)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    printed = (run.stdout + run.stderr).splitlines()
    assert len(printed) < 10, printed
    meta = _metadata(out)
    assert json.loads(meta["classes"]) == names and json.loads(meta["palette"]) == colours
    assert meta["num_classes"] == "7" and meta["isr"] == "1111-222" and meta["dynamic"] == "batch, height, width"
    assert json.loads(meta["mean"]) == list(MEAN) and json.loads(meta["std"]) == list(STD)
    assert json.loads(meta["test_protocol"]) == {"scale": [2048, 512], "divisor": 32, "mode": "whole",
                                                 "crop_size": [512, 512], "stride": [341, 341], "tta_scales": [],
                                                 "flip": False}  # TestProtocol.to_dict(), as in checkpoints
    assert "multiple of 32" in meta["resize"]
    assert _input_dims(out) == ["batch", 3, "height", "width"]
    results = verify_onnx(seven, out, [(128, 128), (96, 160), (77, 131)], isr="1111-222")
    results += verify_onnx(seven, out, [(96, 128)], isr="1111-222", batch=3)
    assert all(r["max_abs_diff"] <= TOL for r in results), results
    assert str(seven.isr) == "1111-111"  # the model's own ISR setting is untouched


def test_metadata_classes_fall_back_to_the_dataset_or_generated():
    city = edaformer.create_model("edaformer-t-cityscapes")
    meta = onnx_metadata(city, classes=["only", "two"])
    assert json.loads(meta["classes"])[:2] == ["road", "sidewalk"]
    protocol = json.loads(meta["test_protocol"])
    assert protocol["mode"] == "slide" and protocol["crop_size"] == [1024, 1024] and protocol["stride"] == [768, 768]
    assert "1024x1024 windows every 768x768" in meta["resize"]
    odd = edaformer.create_model(NAME, num_classes=5)
    meta = onnx_metadata(odd)
    assert len(json.loads(meta["classes"])) == 5 and len(json.loads(meta["palette"])) == 5


def test_metadata_states_the_given_test_protocol():
    from edaformer.inference import TestProtocol

    model = edaformer.create_model(NAME, num_classes=5)
    meta = onnx_metadata(model, protocol=TestProtocol(scale=(480, 360), divisor=32))
    assert json.loads(meta["test_protocol"]) == {"scale": [480, 360], "divisor": 32, "mode": "whole",
                                                 "crop_size": [512, 512], "stride": [341, 341], "tta_scales": [],
                                                 "flip": False}
    assert "(480, 360) (long, short) box" in meta["resize"]
