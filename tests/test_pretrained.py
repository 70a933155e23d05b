"""Shipped weights: ``edaformer package-weights``, :mod:`edaformer.pretrained`, and predict / eval by name."""
from __future__ import annotations

import copy
import errno
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import edaformer
from edaformer import checkpoint, pretrained
from edaformer.checkpoint import (CheckpointWriteError, CorruptCheckpointError, checkpoint_num_classes,
                                  load_checkpoint, read_checkpoint, save_checkpoint)
from edaformer.cli import build_parser, main
from edaformer.config import load_config
from edaformer.engine.state import checkpoint_payload
from edaformer.inference import Segmenter, TestProtocol

from tests.helpers import training_data

MODEL = "edaformer-t-ade20k"
CLASSES = ["sky", "road", "car"]
PALETTE = [[10, 20, 30], [40, 50, 60], [70, 80, 90]]
PROTOCOL = TestProtocol(scale=(64, 48), divisor=32)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-class model and its training checkpoint (the trainer's payload, with config and mIoU)."""
    torch.manual_seed(0)
    model = edaformer.create_model(MODEL, num_classes=3).eval()
    with torch.no_grad():  # BN statistics that are not the defaults, to see them shipped
        model.decoder.fuse.bn.running_mean.uniform_(-0.5, 0.5)
        model.decoder.fuse.bn.running_var.uniform_(0.5, 2.0)
        model.decoder.fuse.bn.num_batches_tracked.fill_(1234)
    meta = {"iteration": 400, "CLASSES": CLASSES, "PALETTE": PALETTE, "test_protocol": PROTOCOL.to_dict(),
            "mIoU": 0.2285, "isr": "2211-222"}
    config = {"model": {"name": MODEL, "num_classes": 3}, "data": {"type": "folder", "scale": [64, 48]}}
    path = save_checkpoint(checkpoint_payload(model, meta, config=config), tmp_path_factory.mktemp("run") / "best.pth")
    return model, path


@pytest.fixture(scope="module")
def shipped(trained, tmp_path_factory):
    """A weights folder holding the default name and ``tiny``, written by package-weights."""
    folder = tmp_path_factory.mktemp("weights")
    _, path = trained
    pretrained.package_weights(path, pretrained.DEFAULT_NAME, out=folder)
    pretrained.package_weights(path, "tiny", isr="1111-222", pool="max", out=folder / "tiny.safetensors")
    return folder


@pytest.fixture
def installed(shipped, monkeypatch):
    """The package's weights folder is ``shipped``."""
    monkeypatch.setattr(pretrained, "weights_dir", lambda: shipped)
    return shipped


def _rounded(model):
    """A copy with every floating tensor rounded to float16 and back."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(out.parameters()) + list(out.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return out


# -- 1. package-weights ---------------------------------------------------------------------------
def test_package_weights_writes_fp16_safetensors_whose_metadata_round_trip(trained, tmp_path, capsys):
    from safetensors import safe_open

    model, path = trained
    assert main(["package-weights", str(path), "--name", "camvid-t", "--out", str(tmp_path)]) == 0
    out = tmp_path / "camvid-t.safetensors"
    size = out.stat().st_size
    printed = capsys.readouterr().out
    assert f"wrote {out} ({size / 2**20:.2f} MiB" in printed and "ISR 2211-222 avg" in printed
    assert "mIoU 22.85" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["camvid-t.safetensors"]  # no temporary file left
    state = model.state_dict()
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(state)
        for key in state:
            t = f.get_tensor(key)
            if state[key].is_floating_point():
                assert t.dtype == torch.float16 and torch.equal(t, state[key].half()), key
            else:
                assert t.dtype == state[key].dtype and torch.equal(t, state[key]), key
    assert int(f"{meta['num_classes']}") == 3 and meta["model"] == MODEL
    assert json.loads(meta["classes"]) == CLASSES and json.loads(meta["palette"]) == PALETTE
    assert TestProtocol.from_dict(json.loads(meta["test_protocol"])) == PROTOCOL
    assert (meta["isr"], meta["isr_pool"]) == ("2211-222", "avg")  # the checkpoint's stored setting
    assert json.loads(meta["config"]) == read_checkpoint(path)["config"]
    assert meta["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (meta["iteration"], float(meta["mIoU"])) == ("400", 0.2285)
    info = pretrained.read_info(out)
    assert (info.name, info.classes, info.palette, info.protocol) == (
        "camvid-t", tuple(CLASSES), tuple(map(tuple, PALETTE)), PROTOCOL)
    assert (info.isr, info.isr_pool, info.iteration, info.mIoU) == ("2211-222", "avg", 400, 0.2285)


def test_repackaging_a_shipped_file_changes_its_isr_and_keeps_its_provenance(trained, tmp_path):
    """A shipped file packaged again (another recommended ISR) holds the same tensors and still
    names the training checkpoint it came from, its iteration and mIoU."""
    from safetensors import safe_open

    _, path = trained
    first = pretrained.package_weights(path, "camvid-t", out=tmp_path / "a.safetensors")
    again = pretrained.package_weights(first.path, "camvid-t", isr="2221-211", out=tmp_path / "b.safetensors")
    a, b = pretrained.read_info(first.path), pretrained.read_info(again.path)
    assert (a.isr, b.isr) == ("2211-222", "2221-211")
    assert b.source_sha256 == a.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (b.iteration, b.mIoU, b.config, b.protocol) == (a.iteration, a.mIoU, a.config, a.protocol)
    with safe_open(str(first.path), framework="pt") as f, safe_open(str(again.path), framework="pt") as g:
        assert f.metadata()["checksum"] == g.metadata()["checksum"]  # the same float16 tensors


def test_package_weights_options_and_errors(trained, tmp_path, monkeypatch, capsys):
    model, path = trained
    monkeypatch.setattr(pretrained, "weights_dir", lambda: tmp_path / "pkg")
    assert main(["package-weights", str(path), "--name", "x", "--isr", "1111-222", "--pool", "max"]) == 0
    info = pretrained.read_info(tmp_path / "pkg" / "x.safetensors")  # the package folder by default
    assert (info.isr, info.isr_pool) == ("1111-222", "max")
    capsys.readouterr()
    assert main(["package-weights", str(path), "--name", "bad/name"]) == 2
    assert "weights name 'bad/name' must be letters" in capsys.readouterr().err
    assert main(["package-weights", str(path), "--name", "x", "--isr", "22-1"]) == 2
    assert "ISR spec '22-1'" in capsys.readouterr().err
    big = copy.deepcopy(model)
    with torch.no_grad():
        big.decoder.classifier.weight[0, 0] = 1e6
    huge = save_checkpoint(checkpoint_payload(big, {}), tmp_path / "huge.pth")
    with pytest.raises(ValueError, match=r"huge.pth: decoder.classifier.weight holds values beyond the float16 range"):
        pretrained.package_weights(huge, "huge", out=tmp_path)
    bare = save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match=r"bare.pth stores no model name"):
        pretrained.package_weights(bare, "bare", out=tmp_path)


def test_package_weights_config_option_fills_what_the_checkpoint_lacks(tmp_path, capsys):
    """A checkpoint without config, protocol or class names (a bare model file): --config supplies them."""
    cfg_path = training_data.write_config(tmp_path / "config.yaml", tmp_path / "data", size=48,
                                          model={"decoder_depths": [1, 2, 1]})
    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    model = edaformer.create_model(MODEL, num_classes=4, decoder_depths=(1, 2, 1))
    source = save_checkpoint(model, tmp_path / "model.pth")
    with pytest.raises(ValueError, match=r"model.pth stores no training config.*\(--config\)\ncheckpoint does not "
                                         "match the model"):  # the architecture is in the config
        pretrained.package_weights(source, "blocks", out=tmp_path)
    assert main(["package-weights", str(source), "--name", "blocks", "--config", str(cfg_path),
                 "--out", str(tmp_path / "blocks.safetensors")]) == 0
    info = pretrained.read_info(tmp_path / "blocks.safetensors")
    assert info.config == json.loads(json.dumps(cfg)) and info.config["model"]["decoder_depths"] == [1, 2, 1]
    assert info.protocol == TestProtocol.from_config(cfg) and info.protocol.scale == (48, 48)
    assert info.classes == tuple(training_data.CLASSES) and (info.mIoU, info.iteration) == (None, None)
    loaded, _ = pretrained.load_pretrained("blocks", folder=tmp_path)
    assert tuple(loaded.decoder_depths) == (1, 2, 1)


def test_package_weights_is_atomic(trained, tmp_path, monkeypatch):
    _, path = trained
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"previous")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.os, "fsync", full_disk)
    with pytest.raises(CheckpointWriteError, match="no space left on device while writing .*w.safetensors"):
        pretrained.package_weights(path, "w", out=target)
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# -- 2. edaformer.pretrained -------------------------------------------------------------------------
def test_load_pretrained_equals_the_fp16_rounded_model(trained, installed):
    model, _ = trained
    loaded, info = edaformer.load_pretrained("tiny")
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values() if t.is_floating_point())
    assert int(loaded.decoder.fuse.bn.num_batches_tracked) == 1234
    assert (info.model, info.num_classes, info.isr, info.isr_pool, info.mIoU) == (MODEL, 3, "1111-222", "max", 0.2285)
    assert str(loaded.isr) == "1111-111" and not loaded.training  # the recommended setting is info.isr
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected, full = loaded(x), _rounded(model)(x), model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - full).abs().max() < 0.05 * full.abs().max()  # float16 weights: close to the fp32 model


def test_list_pretrained_and_unknown_names(installed, tmp_path, monkeypatch):
    assert edaformer.list_pretrained() == pretrained.list_pretrained() == sorted([pretrained.DEFAULT_NAME, "tiny"])
    with pytest.raises(pretrained.UnknownPretrainedError,
                       match=rf"^no shipped model 'nope'; available: {pretrained.DEFAULT_NAME}, tiny$"):
        pretrained.load_pretrained("nope")
    monkeypatch.setattr(pretrained, "weights_dir", lambda: tmp_path / "empty")
    assert edaformer.list_pretrained() == []
    with pytest.raises(ValueError, match="no model is shipped with this install"):
        pretrained.load_pretrained()


def test_package_weights_folder_holds_no_stray_files():
    """The real weights folder: what is there is shipped weights or the README."""
    folder = pretrained.weights_dir()
    assert folder.is_dir() and (folder / "README.md").is_file()
    assert all(p.name == "README.md" or p.name.endswith(".safetensors") for p in folder.iterdir())
    assert edaformer.list_pretrained() == sorted(p.name[:-12] for p in folder.glob("*.safetensors"))


def test_corrupt_and_foreign_safetensors(shipped, tmp_path):
    from safetensors.torch import save_file

    data = bytearray((shipped / "tiny.safetensors").read_bytes())
    data[-3] ^= 0xFF  # a byte of the last tensor
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"bad.safetensors are corrupt"):
        pretrained.read_weights(bad)
    (tmp_path / "cut.safetensors").write_bytes(bytes(data[:100]))
    with pytest.raises(ValueError, match=r"could not read weights .*cut.safetensors"):
        read_checkpoint(tmp_path / "cut.safetensors")
    foreign = tmp_path / "foreign.bin"
    save_file({"decoder.classifier.weight": torch.zeros(5, 128, 1, 1, dtype=torch.float16)}, str(foreign))
    obj = read_checkpoint(foreign)  # recognised by its header; a bare state dict
    assert obj["state_dict"]["decoder.classifier.weight"].dtype == torch.float32
    assert checkpoint_num_classes(obj) == 5
    with pytest.raises(ValueError, match="without edaformer metadata"):
        pretrained.read_info(foreign)


# -- 3. checkpoints by name: read_checkpoint, Segmenter, predict, eval ---------------------------------
def test_read_checkpoint_takes_a_shipped_name(trained, installed):
    model, _ = trained
    obj = read_checkpoint("tiny")
    assert checkpoint.resolve_checkpoint_source("tiny") == installed / "tiny.safetensors"
    assert obj["state_dict"]["decoder.classifier.weight"].dtype == torch.float32
    assert checkpoint_num_classes(obj) == 3
    fresh = edaformer.create_model(MODEL, num_classes=3)
    report = load_checkpoint(fresh, "tiny")
    assert report["format"] == "edaformer" and report["meta"]["CLASSES"] == CLASSES
    assert report["meta"]["isr"] == "1111-222" and report["meta"]["test_protocol"] == PROTOCOL.to_dict()
    with pytest.raises(FileNotFoundError, match=rf"^checkpoint not found: nope \(nor a shipped model: "
                                                rf"{pretrained.DEFAULT_NAME}, tiny\)$"):
        read_checkpoint("nope")
    with pytest.raises(FileNotFoundError, match=r"^checkpoint not found: \S+nope.pth$"):
        read_checkpoint(installed / "nope.pth")


def _image(path, h=40, w=56):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_predict_without_model_or_checkpoint_uses_the_shipped_default(installed, tmp_path, capsys):
    image = _image(tmp_path / "street.png")
    assert main(["predict", str(image), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert "wrote 1 prediction(s)" in capsys.readouterr().out
    label = Image.open(tmp_path / "out" / "street_label.png")
    assert label.mode == "P" and label.size == (56, 40)
    assert label.getpalette()[:9] == [v for c in PALETTE for v in c]
    expected = Segmenter.pretrained(device="cpu")(str(image))
    np.testing.assert_array_equal(np.asarray(label), expected)
    assert Image.open(tmp_path / "out" / "street_overlay.png").size == (56, 40)
    # a shipped name as --checkpoint, with or without --model: the same labels
    for extra in ([], ["--model", MODEL]):
        out = tmp_path / f"out{len(extra)}"
        assert main(["predict", str(image), "--checkpoint", pretrained.DEFAULT_NAME, "--out", str(out),
                     "--device", "cpu", *extra]) == 0
        np.testing.assert_array_equal(np.asarray(Image.open(out / "street_label.png")), expected)


def test_predict_without_a_shipped_model_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "weights_dir", lambda: tmp_path / "none")
    image = _image(tmp_path / "a.png")
    assert main(["predict", str(image), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == \
        "edaformer predict: error: no model is shipped with this install; pass --checkpoint"
    assert main(["predict", str(image), "--checkpoint", "nope", "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 2
    assert "checkpoint not found: nope" in capsys.readouterr().err
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "other.safetensors").write_bytes(b"")
    assert main(["predict", str(image), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"edaformer predict: error: the default model {pretrained.DEFAULT_NAME} is not shipped with this install; "
        "pass --checkpoint (a checkpoint file, or a shipped model: other)")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_predict_help_names_the_default_model(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines at hyphens too
    assert f"default:theshipped{pretrained.DEFAULT_NAME}" in text


def test_eval_accepts_a_shipped_name(tmp_path, monkeypatch, capsys):
    data = training_data.make_dataset(tmp_path / "data", n=2)
    cfg_path = training_data.write_config(tmp_path / "e.yaml", data)
    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    model = edaformer.create_model(MODEL, num_classes=4)
    protocol = TestProtocol.from_config(cfg)
    meta = {"CLASSES": training_data.CLASSES, "test_protocol": protocol.to_dict()}
    source = save_checkpoint(checkpoint_payload(model, meta, config=cfg), tmp_path / "run.pth")
    pretrained.package_weights(source, "blocks", out=tmp_path / "weights")
    monkeypatch.setattr(pretrained, "weights_dir", lambda: tmp_path / "weights")
    rounded = save_checkpoint(checkpoint_payload(_rounded(model), meta), tmp_path / "rounded.pth")
    results = []
    for ckpt in ("blocks", str(rounded)):
        assert main(["eval", str(cfg_path), "--checkpoint", ckpt, "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        assert "(edaformer format)" in out
        results.append(out.split("images 2", 1)[1])  # the metrics and class table
    assert "mIoU" in results[0] and results[0] == results[1]
