"""Checkpoint formats, key maps, mismatch reports, atomic saving."""
import os

import pytest
import torch

import edaformer
from edaformer.checkpoint import (CheckpointMismatchError, checkpoint_num_classes, native_to_reference,
                                  read_checkpoint, reference_to_native)
from tests.helpers.reference import manifest, requires_fixtures


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return edaformer.create_model("edaformer-t-ade20k").eval()


@requires_fixtures
@pytest.mark.parametrize("size", ["t", "b"])
def test_key_map_covers_reference_manifest_both_ways(size):
    name = {"t": "edaformer-t-ade20k", "b": "edaformer-b-ade20k"}[size]
    target = edaformer.create_model(name).state_dict()
    ref = {e["key"]: torch.empty(e["shape"]) for e in manifest(size)["state_dict"]}
    native = reference_to_native(ref)
    assert set(native) == set(target)
    assert all(native[k].shape == target[k].shape for k in target)
    back = native_to_reference(native)
    assert set(back) == set(ref)
    assert all(back[k].shape == ref[k].shape for k in ref), "conv_seg and every other shape as the reference"


def test_roundtrip_all_formats(model, tmp_path):
    sd = model.state_dict()
    ref_path = edaformer.export_reference(model, tmp_path / "ref.pth", meta={"CLASSES": ("a",) * 150})
    raw = torch.load(ref_path, weights_only=True)
    assert set(raw) == {"state_dict", "meta"}
    assert "decode_head.conv_seg.weight" in raw["state_dict"]
    assert "backbone.block1.0.mlp.dwconv.dwconv.weight" in raw["state_dict"]
    forms = {
        "reference file": ref_path,
        "reference bare": raw["state_dict"],
        "native file": edaformer.save_checkpoint(model, tmp_path / "native.pth"),
        "native bare": sd,
        "ddp-wrapped": {"model": {"module." + k: v for k, v in sd.items()}},
    }
    for what, ckpt in forms.items():
        fresh = edaformer.create_model("edaformer-t-ade20k")
        report = edaformer.load_checkpoint(fresh, ckpt)
        assert not report["missing"] and not report["unexpected"], what
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items()), what
    assert edaformer.load_checkpoint(model, ref_path)["meta"]["CLASSES"][0] == "a"


def test_encoder_only_imagenet_checkpoint(model):
    ref = native_to_reference(model.state_dict())
    imagenet = {k[len("backbone."):]: v for k, v in ref.items() if k.startswith("backbone.")}
    imagenet["head.weight"] = torch.zeros(1000, 256)
    imagenet["head.bias"] = torch.zeros(1000)
    fresh = edaformer.create_model("edaformer-t-ade20k", num_classes=7)
    report = edaformer.load_checkpoint(fresh, {"model": imagenet})
    assert report["format"] == "encoder"
    assert torch.equal(fresh.encoder.stages[2].blocks[3].attn.sr.weight,
                       model.encoder.stages[2].blocks[3].attn.sr.weight)
    # the same file into a timm classifier keeps the head
    import timm
    clf = timm.create_model("eft_t")
    edaformer.load_checkpoint(clf, imagenet)
    assert torch.equal(clf.head.weight, imagenet["head.weight"])


def test_mismatch_lists_missing_unexpected_and_shapes(model):
    sd = dict(model.state_dict())
    del sd["decoder.fuse.conv.weight"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    sd["decoder.classifier.weight"] = torch.zeros(3, 128, 1, 1)
    for i in range(12):
        sd.pop(f"encoder.stages.2.blocks.{i % 10}.norm1.weight", None)
    with pytest.raises(CheckpointMismatchError) as err:
        edaformer.load_checkpoint(edaformer.create_model("edaformer-t-ade20k"), sd)
    msg = str(err.value)
    assert "missing keys (11)" in msg and "encoder.stages.2.blocks.9.norm1.weight" in msg and "... and 1 more" in msg
    assert "unexpected keys (1)" in msg and "decoder.extra.weight" in msg
    assert "shape mismatches (1)" in msg and "checkpoint (3, 128, 1, 1) vs model (150, 128, 1, 1)" in msg
    report = edaformer.load_checkpoint(edaformer.create_model("edaformer-t-ade20k"), sd, strict=False)
    assert len(report["missing"]) == 11 and report["unexpected"] == ["decoder.extra.weight"]


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(ValueError, match=r"could not read checkpoint .*junk.pth: it is not a PyTorch checkpoint"):
        read_checkpoint(junk)
    pickled = tmp_path / "obj.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "fn": os.getcwd}, pickled)
    with pytest.raises(ValueError, match=r"obj.pth: it holds a Python object \(\S*getcwd\) .* not loaded for safety"):
        read_checkpoint(pickled)


@pytest.mark.parametrize("name, content, match", [
    ("config.yaml", "model: {name: edaformer-t-ade20k}\n", r"config.yaml: it is a YAML config, not a PyTorch checkpoint"),
    ("notes.pth", "just some words\n", r"notes.pth: it is a text file, not a PyTorch checkpoint"),
    ("empty.pth", "", r"empty.pth: the file is empty"),
])
def test_non_checkpoint_files_say_what_they_are(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        read_checkpoint(tmp_path / name)
    assert "weights_only" not in str(err.value)


def test_truncated_checkpoint_and_directory(model, tmp_path):
    path = edaformer.save_checkpoint({"x": torch.zeros(10)}, tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"could not read checkpoint .*cut.pth: it is corrupt or truncated") as err:
        read_checkpoint(tmp_path / "cut.pth")
    assert "weights_only" not in str(err.value)
    with pytest.raises(ValueError, match=r"checkpoint .* is a directory"):
        read_checkpoint(tmp_path)


def test_checkpoint_num_classes_in_every_format(model, tmp_path):
    small = edaformer.create_model("edaformer-t-ade20k", num_classes=7)
    native = edaformer.save_checkpoint(small, tmp_path / "native.pth")
    reference = edaformer.export_reference(small, tmp_path / "ref.pth")
    assert checkpoint_num_classes(native) == 7 and checkpoint_num_classes(str(reference)) == 7
    assert checkpoint_num_classes({"model": {"module." + k: v for k, v in small.state_dict().items()}}) == 7
    assert checkpoint_num_classes(model.state_dict()) == 150
    encoder_only = {k: v for k, v in small.state_dict().items() if k.startswith("encoder.")}
    assert checkpoint_num_classes(encoder_only) is None


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    edaformer.save_checkpoint({"iteration": 1}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        edaformer.save_checkpoint({"iteration": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"iteration": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pth"]


def test_export_reference_cli(model, tmp_path):
    from edaformer.cli import main
    src = edaformer.save_checkpoint(model, tmp_path / "native.pth")
    assert main(["export-reference", str(src), "--model", "edaformer-t-ade20k", "--out", str(tmp_path / "r.pth")]) == 0
    out = torch.load(tmp_path / "r.pth", weights_only=True)
    assert out["state_dict"]["backbone.patch_embed1.proj.weight"].shape == (32, 3, 7, 7)
    assert main(["export-reference", str(tmp_path / "missing.pth"), "--model", "edaformer-t-ade20k",
                 "--out", str(tmp_path / "x.pth")]) == 2
