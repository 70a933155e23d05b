"""ONNX export: onnxruntime agrees with PyTorch, fixed and dynamic input sizes, ISR baked in."""
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

import edaformer  # noqa: E402
from edaformer.cli import main  # noqa: E402
from edaformer.export import export_onnx, min_input_side, verify_onnx  # noqa: E402

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


@pytest.mark.slow
def test_dynamic_export_runs_other_sizes(model, tmp_path):
    out = export_onnx(model, tmp_path / "dyn.onnx", size=(128, 128), isr="1111-222", dynamic=True)
    dims = _input_dims(out)
    assert dims[:2] == [1, 3] and all(isinstance(d, str) for d in dims[2:])
    results = verify_onnx(model, out, [(128, 128), (96, 160), (77, 131)], isr="1111-222")
    assert all(r["max_abs_diff"] <= TOL for r in results), results
    assert str(model.isr) == "1111-111"


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
