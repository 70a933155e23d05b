"""``edaformer predict`` and :func:`edaformer.inference.predict.predict_files`."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import edaformer
from edaformer import cli
from edaformer.data.palettes import DATASET_INFO
from edaformer.inference import Segmenter, TestProtocol, load_image
from edaformer.inference.predict import collect_inputs, predict_files, rank_share, unique_stems
from edaformer.models import MODEL_SPECS

from tests.helpers.stubs import ADE, Stub, rgb


@pytest.fixture
def small_ade_spec(monkeypatch):
    """Make the ADE20K model's test scale small so that the command runs fast."""
    monkeypatch.setitem(MODEL_SPECS, ADE, dataclasses.replace(MODEL_SPECS[ADE], test_scale=(96, 64)))


def test_predict_command(ade_model, ade_checkpoint, small_ade_spec, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(rgb(61, 97, 1)).save(folder / "street.png")
    Image.fromarray(rgb(40, 33, 2)[..., 0], mode="L").save(folder / "gray.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "nested").mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "empty").mkdir()
    single = tmp_path / "single.bmp"
    Image.fromarray(rgb(20, 31, 3)).save(single)
    out = tmp_path / "out"

    rc = cli.main(["predict", str(folder), str(single), str(tmp_path / "empty"), "--model", ADE,
                   "--checkpoint", str(ade_checkpoint), "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "broken.png" in captured.err
    for skipped in ("notes.txt: unsupported extension '.txt'", "nested: subfolder", "empty: folder without images"):
        assert skipped in captured.err
    assert "3 input(s) skipped" in captured.out
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}_{k}.png" for s in ("street", "gray", "single") for k in ("label", "overlay"))

    seg = Segmenter(ade_model, device="cpu", test_scale=(96, 64))
    ade_palette = [v for c in DATASET_INFO["ade20k"].palette for v in c]
    for stem, src, size in (("street", folder / "street.png", (97, 61)), ("gray", folder / "gray.jpg", (33, 40)),
                            ("single", single, (31, 20))):
        label = Image.open(out / f"{stem}_label.png")
        assert label.mode == "P" and label.size == size
        assert label.getpalette()[:450] == ade_palette
        np.testing.assert_array_equal(np.asarray(label), seg(load_image(src)))
        over = Image.open(out / f"{stem}_overlay.png")
        assert over.mode == "RGB" and over.size == size


def test_predict_command_all_good_with_legend_and_probs(ade_model, ade_checkpoint, small_ade_spec, tmp_path):
    img = tmp_path / "a.jpeg"
    Image.fromarray(rgb(30, 40)).save(img)
    rc = cli.main(["predict", str(img), "--model", ADE, "--checkpoint", str(ade_checkpoint),
                   "--out", str(tmp_path / "o"), "--isr", "2211-222", "--legend", "--save-probs"])
    assert rc == 0
    label = np.asarray(Image.open(tmp_path / "o" / "a_label.png"))
    over = Image.open(tmp_path / "o" / "a_overlay.png")
    assert over.height >= 30 and over.width > 40      # the legend panel is added on the right
    probs = Image.open(tmp_path / "o" / "a_probs.png")
    assert probs.mode == "L" and probs.size == (40, 30)
    with edaformer.isr(ade_model, "2211-222"):
        expected, conf = Segmenter(ade_model, device="cpu", test_scale=(96, 64)).predict(load_image(img), True)
    np.testing.assert_array_equal(label, expected)
    np.testing.assert_array_equal(np.asarray(probs), np.rint(conf * 255).astype(np.uint8))  # 0-1 as 0-255
    assert conf.dtype == np.float32 and 1 / 150 <= conf.min() and conf.max() <= 1  # the top class: at least 1/K


def test_predict_uses_the_checkpoint_protocol_and_command_line_overrides(ade_model, tmp_path):
    stored = TestProtocol(scale=(96, 64))  # not the model spec's (2048, 512)
    ckpt = edaformer.export_reference(ade_model, tmp_path / "ref.pth", meta={"test_protocol": stored.to_dict()})
    img = tmp_path / "a.png"
    Image.fromarray(rgb(61, 97)).save(img)
    shapes = []
    hook = ade_model.encoder.stages[0].downsample.register_forward_pre_hook(
        lambda m, args: shapes.append(tuple(args[0].shape[-2:])))
    try:
        assert cli.main(["predict", str(img), "--model", ADE, "--checkpoint", str(ckpt), "--out",
                         str(tmp_path / "o")]) == 0
        expected = Segmenter(ade_model, device="cpu", protocol=stored)(load_image(img))
    finally:
        hook.remove()
    assert shapes == [(64, 96)]  # 61x97 fitted into (96, 64): 60x96, sides to 32
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "a_label.png")), expected)
    assert cli.main(["predict", str(img), "--model", ADE, "--checkpoint", str(ckpt), "--out", str(tmp_path / "s"),
                     "--scale", "64", "48", "--mode", "slide"]) == 0
    slide = Segmenter(ade_model, device="cpu", protocol=stored.replace(scale=(64, 48), mode="slide"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "s" / "a_label.png")), slide(load_image(img)))


def test_predict_command_errors(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(rgb(8, 8)).save(img)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    args = ["predict", str(img), "--model", ADE, "--out", str(tmp_path / "o")]
    assert cli.main(args + ["--checkpoint", str(bad)]) == 2
    assert "bad.pth" in capsys.readouterr().err
    assert cli.main(args + ["--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(tmp_path / "empty"), "--model", ADE, "--checkpoint", str(bad),
                     "--out", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(args + ["--checkpoint", str(bad), "--device", "cuda"]) == 2
        assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "taken").write_text("a file")
    assert cli.main(["predict", str(img), "--model", ADE, "--checkpoint", str(bad), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "taken is a file" in err and len(err.strip().splitlines()) == 1


def test_bad_alpha_is_refused_before_any_work(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(rgb(8, 8)).save(img)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(img), "--model", ADE, "--checkpoint", str(tmp_path / "missing.pth"),
                  "--out", str(tmp_path / "o"), "--alpha", "2"])
    assert exit_info.value.code == 2
    assert "must be in [0, 1], got 2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_failing_image_is_reported_and_the_others_finish(tmp_path, monkeypatch):
    seg = Segmenter(Stub(num_classes=3), device="cpu", test_scale=(32, 16))
    files = []
    for name in ("a", "huge", "c"):
        files.append(tmp_path / f"{name}.png")
        Image.fromarray(rgb(12, 10)).save(files[-1])
    predict = seg.predict

    def failing(image, confidence=False):
        if failing.calls == 1:
            failing.calls += 1
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory\nmore")
        failing.calls += 1
        return predict(image, confidence)

    failing.calls = 0
    monkeypatch.setattr(seg, "predict", failing)
    errors = []
    result = predict_files(seg, files, tmp_path / "o", save_probs=True, on_error=lambda p, m: errors.append(m))
    assert result.written == [files[0], files[2]] and [p for p, _ in result.failed] == [files[1]]
    assert errors == [f"{files[1]}: [enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(
        f"{s}_{k}.png" for s in ("a", "c") for k in ("label", "overlay", "probs"))


def test_inputs_and_stems(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.JPG", "a.png", "x.gif"):
        (tmp_path / "d" / name).write_bytes(b"")
    found = collect_inputs([tmp_path / "d", tmp_path / "missing.png"])
    assert found.files == [tmp_path / "d" / "a.png", tmp_path / "d" / "b.JPG", tmp_path / "missing.png"]
    assert found.skipped == [(tmp_path / "d" / "x.gif", "unsupported extension '.gif'")]
    assert unique_stems(["p/a.png", "q/a.jpg", "a.bmp", "b.png"]) == ["a", "a_1", "a_2", "b"]


def test_rank_shares_are_disjoint_cover_the_files_and_keep_the_stems(tmp_path):
    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "y.png", tmp_path / "z.jpg",
             tmp_path / "c" / "x.bmp"]
    stems = unique_stems(files)
    for world in (1, 2, 3, 7):
        shares = [rank_share(files, rank, world) for rank in range(world)]
        assert shares == [rank_share(files, rank, world) for rank in range(world)]  # deterministic
        taken = [(f, s) for share_files, share_stems in shares for f, s in zip(share_files, share_stems)]
        assert sorted(taken) == sorted(zip(files, stems))  # disjoint, all covered, one process's stems
    assert rank_share(files, 1, 2) == ([files[1], files[3]], ["x_1", "z"])
    with pytest.raises(ValueError, match="rank 2 is not among the 2 processes"):
        rank_share(files, 2, 2)
