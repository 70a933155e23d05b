"""ONNX Runtime backend: exported files give the torch path's labels, through Segmenter, predict and eval."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

import edaformer  # noqa: E402
from edaformer import cli  # noqa: E402
from edaformer.export import export_onnx  # noqa: E402
from edaformer.inference import OnnxModel, Segmenter, TestProtocol, load_image  # noqa: E402
from edaformer.meta import OUTPUT_STRIDE  # noqa: E402

from tests.helpers.stubs import ADE, rgb  # noqa: E402
from tests.helpers.training_data import CAMVID, make_dataset, write_config  # noqa: E402

SIZE = (64, 96)                                    # the export's fixed input (H, W)
PROTOCOL = TestProtocol(scale=(96, 64), divisor=32)  # 3:2 images run at 64x96
AGREE = 0.999                                      # least share of equal labels, ONNX Runtime vs torch


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A random 4-class EDAFormer-T, its checkpoint and its export at 64x96 (and the folder)."""
    torch.manual_seed(0)
    model = edaformer.create_model(ADE, num_classes=4).eval()
    folder = tmp_path_factory.mktemp("small")
    ckpt = edaformer.save_checkpoint(model, folder / "small.pth")
    path = export_onnx(model, folder / "small.onnx", size=SIZE, protocol=PROTOCOL)
    return model, ckpt, path


def _images(n: int = 2, size=(120, 180)) -> list[np.ndarray]:
    return [rgb(*size, seed) for seed in range(n)]


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return float((a == b).mean())


@pytest.mark.slow
def test_onnx_labels_equal_the_torch_path(small):
    model, ckpt, path = small
    torch_seg = Segmenter.from_checkpoint(None, ckpt, device="cpu", protocol=PROTOCOL)
    onnx_seg = Segmenter.from_checkpoint(None, path, device="cpu")  # dispatches on .onnx
    assert isinstance(onnx_seg.model, OnnxModel) and onnx_seg.protocol == PROTOCOL
    assert onnx_seg.model.output_stride == 8 and str(onnx_seg.model.isr) == "1111-111"
    assert onnx_seg.model.session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    x = torch.randn(1, 3, *SIZE)
    with torch.inference_mode():
        low = model.decode(x)
    assert onnx_seg.model.decode(x).shape == low.shape == (1, 4, 8, 12)  # the decoder's logits, stride 8
    assert (onnx_seg.model.decode(x) - low).abs().max() < 1e-4
    for image in _images():
        labels, conf = onnx_seg.predict(image, confidence=True)
        expected, expected_conf = torch_seg.predict(image, confidence=True)
        assert _agreement(labels, expected) >= AGREE
        assert np.abs(conf.astype(int) - expected_conf.astype(int)).max() <= 1
    # batches of one size run one image at a time through a graph for one image
    for got, want in zip(onnx_seg.predict_batch(_images(3)), torch_seg.predict_batch(_images(3))):
        assert _agreement(got, want) >= AGREE


@pytest.mark.slow
def test_onnx_runs_sliding_windows_and_flip_like_torch(small):
    """Windows of the export's size: the logits resized to each window, averaged, as with torch."""
    _, ckpt, path = small
    slide = dict(test_scale=(150, 100), mode="slide", crop_size=SIZE, stride=(32, 48), flip=True)
    torch_seg = Segmenter.from_checkpoint(None, ckpt, device="cpu", **slide)
    onnx_seg = Segmenter.from_onnx(path, device="cpu", **slide)
    for image in _images():
        assert _agreement(onnx_seg(image), torch_seg(image)) >= AGREE


def _old_style(path, out):
    """``path`` as exports wrote it before ``output_stride``: logits resized to the input size in the
    graph (ONNX Resize, bilinear, half-pixel, as the exporter wrote ``F.interpolate``), no such key."""
    m = onnx.load(str(path))
    graph = m.graph
    graph.output[0].name = "low"
    for node in graph.node:
        node.output[:] = ["low" if o == "logits" else o for o in node.output]
    i64 = TensorProto.INT64
    graph.initializer.extend([helper.make_tensor("_hw_start", i64, [1], [2]), helper.make_tensor("_hw_end", i64, [1], [4]),
                              helper.make_tensor("_nk_start", i64, [1], [0]), helper.make_tensor("_nk_end", i64, [1], [2])])
    graph.node.extend([
        helper.make_node("Shape", ["image"], ["_in_shape"]),
        helper.make_node("Slice", ["_in_shape", "_hw_start", "_hw_end"], ["_hw"]),
        helper.make_node("Shape", ["low"], ["_low_shape"]),
        helper.make_node("Slice", ["_low_shape", "_nk_start", "_nk_end"], ["_nk"]),
        helper.make_node("Concat", ["_nk", "_hw"], ["_sizes"], axis=0),
        helper.make_node("Resize", ["low", "", "", "_sizes"], ["logits"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    props = {p.key: p.value for p in m.metadata_props if p.key not in (OUTPUT_STRIDE, "isr_pool")}
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, props)
    onnx.save(m, str(out))
    return out


@pytest.mark.slow
def test_files_exported_before_output_stride_still_read(small, tmp_path):
    model, ckpt, path = small
    old = OnnxModel(_old_style(path, tmp_path / "old.onnx"), threads=1)
    assert old.output_stride == 1 and old.isr_pool == "avg"
    x = torch.randn(1, 3, *SIZE)
    assert old.decode(x).shape == (1, 4, *SIZE)
    with torch.inference_mode():
        assert (old.decode(x) - model(x)).abs().max() < 1e-4
    torch_seg = Segmenter.from_checkpoint(None, ckpt, device="cpu", protocol=PROTOCOL)
    old_seg = Segmenter.from_onnx(tmp_path / "old.onnx", device="cpu")
    for image in _images():
        assert _agreement(old_seg(image), torch_seg(image)) >= AGREE


@pytest.mark.slow
def test_predict_cli_with_an_onnx_file_writes_the_same_files(small, tmp_path):
    _, ckpt, path = small
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(_images()):
        Image.fromarray(image).save(folder / f"frame{i}.png")
    outs = {}
    for kind, source in (("torch", ckpt), ("onnx", path)):
        outs[kind] = tmp_path / kind
        assert cli.main(["predict", str(folder), "--checkpoint", str(source), "--scale", "96", "64", "--out",
                         str(outs[kind]), "--device", "cpu", "--save-probs"]) == 0
    names = sorted(p.name for p in outs["torch"].iterdir())
    assert names == sorted(p.name for p in outs["onnx"].iterdir()) and len(names) == 6
    for name in names:
        if name.endswith("_label.png"):
            a, b = Image.open(outs["torch"] / name), Image.open(outs["onnx"] / name)
            assert a.mode == b.mode == "P" and a.getpalette() == b.getpalette()
            assert _agreement(np.asarray(a), np.asarray(b)) >= AGREE


@pytest.mark.slow
def test_eval_cli_with_an_onnx_file_gives_the_torch_scores(small, tmp_path, capsys):
    _, ckpt, path = small
    root = make_dataset(tmp_path / "data", sizes=[(64, 96), (64, 96)])
    cfg = write_config(tmp_path / "cfg.yaml", root, data={"scale": [96, 64], "crop_size": [64, 64]})
    printed = {}
    for kind, source in (("torch", ckpt), ("onnx", path)):
        assert cli.main(["eval", str(cfg), "--checkpoint", str(source), "--device", "cpu"]) == 0
        printed[kind] = capsys.readouterr().out
    assert "(onnx format)" in printed["onnx"] and "ISR 1111-111" in printed["onnx"]
    assert cli.main(["eval", str(cfg), "--checkpoint", str(path), "--isr-sweep"]) == 2
    assert "--isr-sweep needs a checkpoint" in capsys.readouterr().err
    score = [next(line for line in printed[k].splitlines() if "mIoU" in line) for k in ("torch", "onnx")]
    assert score[0] == score[1]


def test_not_an_onnx_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "weights.onnx"
    bad.write_bytes(b"not a protobuf at all \x00\xff")
    with pytest.raises(ValueError, match=r"weights\.onnx: not an ONNX model"):
        Segmenter.from_onnx(bad)
    image = tmp_path / "a.png"
    Image.fromarray(rgb(32, 32, 0)).save(image)
    assert cli.main(["predict", str(image), "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edaformer predict: error: ") and str(bad) in err[0]


def test_onnx_file_without_edaformer_metadata_is_a_one_line_error(tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "plain",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 8, 8])])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(plain))
    with pytest.raises(ValueError, match=r"plain\.onnx: an ONNX file without edaformer metadata"):
        OnnxModel(plain)
    cfg = write_config(tmp_path / "cfg.yaml", make_dataset(tmp_path / "data", n=1))
    assert cli.main(["eval", str(cfg), "--checkpoint", str(plain), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without edaformer metadata" in err[0] and str(plain) in err[0]


@pytest.mark.slow
def test_onnx_file_refuses_what_it_does_not_hold(small):
    _, _, path = small
    with pytest.raises(ValueError, match=r"has ISR 1111-111 \(avg pooling\) baked in, not 2211-222"):
        Segmenter.from_onnx(path, isr="2211-222")
    assert str(Segmenter.from_onnx(path, isr="1111-111").model.isr) == "1111-111"
    with pytest.raises(ValueError, match="holds num_classes 4, not 5"):
        Segmenter.from_checkpoint(None, path, num_classes=5)
    seg = Segmenter.from_onnx(path, device="cpu", test_scale=(200, 100))
    with pytest.raises(ValueError, match=r"fixed-size export for 64x96 inputs; this input is 128x160"):
        seg(rgb(120, 180, 0))


@pytest.mark.slow
@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"the CamVid dataset is not at {CAMVID}")
def test_shipped_model_on_camvid_frames_gives_the_torch_labels(shipped_camvid_onnx):
    torch_seg = Segmenter.pretrained("edaformer-t-camvid", device="cpu")
    onnx_seg = Segmenter.from_onnx(shipped_camvid_onnx, device="cpu")
    assert onnx_seg.protocol == torch_seg.protocol and onnx_seg.classes == torch_seg.classes
    assert str(onnx_seg.model.isr) == str(torch_seg.model.isr)  # the stored setting, baked in
    for frame in sorted((CAMVID / "images" / "val").glob("*.jpg"))[:2]:
        image = load_image(frame)
        assert _agreement(onnx_seg(image), torch_seg(image)) >= AGREE
