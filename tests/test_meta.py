"""One schema for what travels with weights (:mod:`edaformer.meta`): checkpoint meta, shipped
safetensors metadata and ONNX metadata, written one way and read back, files of before included."""
from __future__ import annotations

import hashlib
import json

import torch

import edaformer
from edaformer import meta, pretrained
from edaformer.checkpoint import read_checkpoint, save_checkpoint, tensor_checksum
from edaformer.engine.state import checkpoint_payload
from edaformer.export import onnx_metadata
from edaformer.protocol import TestProtocol

CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
                  "Bicyclist")
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
CAMVID_PROTOCOL = TestProtocol(scale=(960, 360), divisor=32, mode="whole", crop_size=(352, 352), stride=(234, 234))


def test_the_shipped_weights_read_back_value_by_value():
    """The shipped file's metadata, read through edaformer.meta, value by value."""
    path = pretrained.weights_path(pretrained.DEFAULT_NAME)
    info = pretrained.read_info(path)
    assert (info.name, info.model, info.num_classes) == ("edaformer-t-camvid", "edaformer-t-ade20k", 11)
    assert (info.classes, info.palette, info.protocol) == (CAMVID_CLASSES, CAMVID_PALETTE, CAMVID_PROTOCOL)
    assert (info.isr, info.isr_pool, info.iteration, info.mIoU) == ("2222-222", "avg", 4000, 0.7097466760781809)
    assert info.source_sha256 == "5647e868dd0b0665b6cf43a36189247c48bb31a29f2a33b8c9e0fabf5d48cedd"
    obj = read_checkpoint(pretrained.DEFAULT_NAME)
    assert {k: v for k, v in obj.items() if k not in ("state_dict", "config")} == {
        "format": "edaformer", "model": "edaformer-t-ade20k", "num_classes": 11,
        "meta": {"CLASSES": list(CAMVID_CLASSES), "PALETTE": [list(c) for c in CAMVID_PALETTE],
                 "test_protocol": {"scale": [960, 360], "divisor": 32, "mode": "whole", "crop_size": [352, 352],
                                   "stride": [234, 234], "tta_scales": [], "flip": False},
                 "isr": "2222-222", "isr_pool": "avg", "iteration": 4000, "mIoU": 0.7097466760781809,
                 "source_sha256": "5647e868dd0b0665b6cf43a36189247c48bb31a29f2a33b8c9e0fabf5d48cedd"}}
    assert obj["meta"] == info.meta()
    assert hashlib.sha256(json.dumps(obj["config"], sort_keys=True).encode()).hexdigest() == \
        "72236ff4f5c0a7e7c87974cfda1a61b0a753d086d867c0d0eedc44b498cd1eda"
    assert len(obj["state_dict"]) == 352
    assert tensor_checksum(obj["state_dict"]) == "331aa8f8a637423f2d86d2d8a90f7771a14734eda7914a277f37a6a2ead3646a"


def test_onnx_metadata_reads_back_and_earlier_files_read_too():
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=3)
    protocol = TestProtocol(scale=(480, 360), divisor=16, tta_scales=(0.5, 1.0), flip=True)
    props = onnx_metadata(model, classes=["a", "b", "c"], dynamic=True, protocol=protocol)
    back = meta.decode_onnx_metadata(props)
    assert TestProtocol.from_dict(back["protocol"]) == protocol
    assert (back["model"], back["num_classes"], back["classes"], back["isr"], back["dynamic"]) == (
        "edaformer-t-ade20k", 3, ["a", "b", "c"], "1111-111", True)
    assert len(back["palette"]) == 3 and len(back["mean"]) == len(back["std"]) == 3
    assert (back["output_stride"], back["isr_pool"]) == (8, "avg")
    # exports written before one schema stated the protocol as mode / test_scale / size_divisor
    earlier = {"mode": "whole", "test_scale": [2048, 512], "size_divisor": 32}
    read = meta.decode_onnx_metadata({"test_protocol": json.dumps(earlier), "dynamic": "none"})
    assert TestProtocol.from_dict(read["protocol"]) == TestProtocol(scale=(2048, 512), divisor=32)
    assert read["dynamic"] is False
    assert read["output_stride"] == 1  # earlier exports wrote the logits at the input size
    slide = {"mode": "slide", "test_scale": [2048, 1024], "size_divisor": None, "crop_size": [1024, 1024],
             "stride": [768, 768]}
    assert TestProtocol.from_dict(slide) == TestProtocol(scale=(2048, 1024), divisor=None, mode="slide",
                                                         crop_size=(1024, 1024), stride=(768, 768))


def test_one_checkpoint_layout_from_every_writer(tmp_path):
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=3)
    stored = meta.checkpoint_meta(classes=["a", "b", "c"], palette=[(1, 2, 3), (4, 5, 6), (7, 8, 9)],
                                  protocol=TestProtocol(), isr="2211-222", isr_pool=None, iteration=5)
    assert stored == {"iteration": 5, "CLASSES": ["a", "b", "c"], "PALETTE": [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
                      "test_protocol": TestProtocol().to_dict(), "isr": "2211-222"}  # None values left out
    saved = read_checkpoint(save_checkpoint(model, tmp_path / "m.pth"))
    payload = checkpoint_payload(model, stored, config={"model": {"name": "edaformer-t-ade20k"}})
    for ckpt in (saved, payload):
        assert (ckpt["format"], ckpt["model"], ckpt["num_classes"]) == ("edaformer", "edaformer-t-ade20k", 3)
        assert ckpt["state_dict"].keys() == model.state_dict().keys()
    assert "meta" not in saved and payload["meta"] == stored and payload["config"]["model"]["name"] == model.name
    assert (meta.stored_classes(stored), meta.stored_palette({}), meta.stored_isr(stored),
            meta.stored_isr_pool(stored)) == (("a", "b", "c"), None, "2211-222", None)


def test_weights_metadata_round_trip():
    fields = dict(model="edaformer-t-ade20k", num_classes=2, classes=("x", "y"), palette=((1, 2, 3), (4, 5, 6)),
                  protocol=TestProtocol(scale=(64, 48)), isr="2211-222", isr_pool="max", config={"a": [1, 2]},
                  mIoU=0.25, iteration=10, source_sha256="ab")
    encoded = meta.encode_weights_metadata(**fields, checksum="c")
    assert all(isinstance(v, str) for v in encoded.values()) and encoded["format"] == meta.WEIGHTS_FORMAT
    decoded = meta.decode_weights_metadata(encoded, "w.safetensors")
    assert decoded == dict(fields, protocol=fields["protocol"].to_dict())
    ckpt = meta.weights_checkpoint({"w": torch.zeros(1)}, decoded)
    assert ckpt["meta"][meta.ISR_POOL] == "max" and ckpt["config"] == {"a": [1, 2]}
