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


def _output_dims(path):
    dims = onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


@pytest.mark.slow
def test_cli_export_fixed_size_matches_onnxruntime(model, tmp_path):
    ckpt = edaformer.save_checkpoint(model, tmp_path / "t.pth")
    out = tmp_path / "t.onnx"
    assert main(["export", NAME, "--checkpoint", str(ckpt), "--isr", "2211-222", "--size", "128", "128",
                 "--out", str(out)]) == 0
    assert _input_dims(out) == [1, 3, 128, 128]
    assert _output_dims(out) == [1, 150, 16, 16]  # the decoder's logits, at output stride 8
    assert _metadata(out)["output_stride"] == "8"
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
    assert meta["output_stride"] == "8" and meta["isr_pool"] == "avg"
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


@pytest.mark.slow
def test_cli_export_of_a_shipped_name_takes_model_and_stored_isr_from_it(shipped_camvid_onnx):
    """``edaformer export --checkpoint edaformer-t-camvid`` (no model name): the architecture and the ISR
    setting the shipped file stores, baked in and stated in the metadata."""
    from edaformer.pretrained import read_info, weights_path

    info = read_info(weights_path("edaformer-t-camvid"))
    meta = _metadata(shipped_camvid_onnx)
    assert meta["isr"] == info.isr and meta["isr_pool"] == info.isr_pool
    assert meta["model"] == info.model and meta["num_classes"] == "11"
    assert json.loads(meta["classes"]) == list(info.classes)
    assert json.loads(meta["test_protocol"]) == info.protocol.to_dict()
    assert meta["output_stride"] == "8" and meta["dynamic"] == "none"
    assert _input_dims(shipped_camvid_onnx) == [1, 3, 384, 480]
    assert _output_dims(shipped_camvid_onnx) == [1, 11, 48, 60]


@pytest.fixture
def exported(monkeypatch):
    """``edaformer export`` with ``export_onnx`` replaced: what it would export (ISR, pool, size)."""
    from edaformer.cli import export as export_cli

    calls = []

    def record(model, path, size, **kwargs):
        calls.append(dict(isr=str(model.isr), pool=model.isr_pool, size=tuple(size), name=model.name,
                          dynamic=kwargs["dynamic"]))
        return Path(path)

    monkeypatch.setattr(export_cli, "export_onnx", record)
    return calls


def test_cli_export_isr_given_wins_over_the_stored_one(exported, tmp_path):
    from edaformer.pretrained import read_info, weights_path

    stored = read_info(weights_path("edaformer-t-camvid"))
    out = str(tmp_path / "m.onnx")
    assert main(["export", "--checkpoint", "edaformer-t-camvid", "--dynamic", "--out", out]) == 0
    assert main(["export", "--checkpoint", "edaformer-t-camvid", "--isr", "2222-222", "--size", "96", "128",
                 "--out", out]) == 0
    assert main(["export", "edaformer-t-cityscapes", "--checkpoint", "edaformer-t-camvid", "--pool", "max",
                 "--size", "96", "128", "--out", out]) == 0  # the same network under another dataset's name
    assert exported == [
        dict(isr=stored.isr, pool=stored.isr_pool, size=(256, 256), name=stored.model, dynamic=True),
        dict(isr="2222-222", pool="avg", size=(96, 128), name=stored.model, dynamic=False),
        dict(isr=stored.isr, pool="max", size=(96, 128), name="edaformer-t-cityscapes", dynamic=False)]

    # a checkpoint storing a reduced setting (as `isr-tune --write` leaves it) exports with that setting
    from edaformer.checkpoint import read_checkpoint, save_checkpoint

    obj = read_checkpoint("edaformer-t-camvid")
    obj["meta"].update(isr="2121-222", isr_pool="max")
    tuned = save_checkpoint(obj, tmp_path / "tuned.pth")
    assert main(["export", "--checkpoint", str(tuned), "--dynamic", "--out", out]) == 0
    assert exported[-1] == dict(isr="2121-222", pool="max", size=(256, 256), name=stored.model, dynamic=True)


def test_cli_export_refuses_a_model_name_the_checkpoint_contradicts(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "edaformer-b-ade20k", "--checkpoint", "edaformer-t-camvid", "--size", "64", "64",
                 "--out", str(out)]) == 2
    assert main(["export", "--checkpoint", "edaformer-t-camvid", "--out", str(out)]) == 2  # fixed size: --size
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["edaformer export: error: model edaformer-b-ade20k contradicts checkpoint edaformer-t-camvid, "
                   "which holds edaformer-t-ade20k; leave the model name out to export the checkpoint's",
                   "edaformer export: error: --size H W is needed for a fixed-size export (or give --dynamic)"]
    assert not out.exists()
