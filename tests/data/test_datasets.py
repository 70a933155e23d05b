"""Datasets, converters, training / test pipelines and loaders of ``edaformer.data``."""
import colorsys
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from edaformer.cli import main
from edaformer.data import (ADE20K, MEAN, STD, CategoryCappedRandomCrop, COCOStuff, Cityscapes, DatasetError,
                            FolderDataset, PadToSize, PhotoMetricDistortion, ResizeToFit, build_dataloader,
                            build_dataset, collate, convert_cityscapes, convert_cocostuff, train_transforms)
from edaformer.data.converters import CITYSCAPES_ID_TO_TRAINID, COCOSTUFF_UNUSED_IDS
from edaformer.data.transforms import fit_size
from tests.helpers.training_data import CAMVID

H, W = 40, 60


# -- helpers ---------------------------------------------------------------------------
def _save_image(path: Path, h: int = H, w: int = W, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _save_label(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8)).save(path)


def _label(num_classes: int, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, (h, w))


def _folder(root: Path, split: str = "train", n: int = 3, num_classes: int = 4, img_suffix: str = ".png") -> Path:
    for i in range(n):
        _save_image(root / "images" / split / f"im{i}{img_suffix}", seed=i)
        _save_label(root / "annotations" / split / f"im{i}.png", _label(num_classes, seed=i))
    return root


def _folder_cfg(root: Path, **kw) -> dict:
    return dict(type="folder", root=str(root), classes=4, img_suffix=".png", **kw)


# -- named datasets and converters --------------------------------------------------------
def test_ade20k_reduce_zero_label(tmp_path):
    raw = np.zeros((H, W), np.uint8)
    raw[:, 10:20], raw[:, 20:30], raw[:, 30:40], raw[:, 40:] = 1, 2, 150, 255
    for split in ("training", "validation"):
        _save_image(tmp_path / "images" / split / "ADE_0001.jpg")
        _save_label(tmp_path / "annotations" / split / "ADE_0001.png", raw)
    ds = ADE20K(tmp_path, "train")  # "train" is an alias of "training"
    assert (ds.num_classes, len(ds.classes), len(ds.palette), ds.ignore_index) == (150, 150, 150, 255)
    image, label = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, H, W) and image.dtype == torch.uint8
    expected = {0: 255, 1: 0, 2: 1, 150: 149, 255: 255}
    for value, out in expected.items():
        assert set(label[torch.from_numpy(raw == value)].tolist()) == {out}
    assert len(ADE20K(tmp_path, "validation")) == 1

    _save_label(tmp_path / "annotations" / "training" / "ADE_0001.png", np.full((H, W), 151))
    with pytest.raises(DatasetError, match=r"ADE_0001\.png has values \[151\].*after reduce_zero_label"):
        ds[0]


def test_cityscapes_converter_and_dataset(tmp_path):
    ids = np.arange(H * W).reshape(H, W) % 36  # every label id 0..35
    img = tmp_path / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    _save_image(img)
    _save_label(tmp_path / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", ids)
    with pytest.raises(DatasetError, match=r"1 of 1 images .* have no label: .*aachen_000000_000019_leftImg8bit"
                                           r"\.png.*edaformer convert cityscapes"):
        Cityscapes(tmp_path, "train")

    result = convert_cityscapes(tmp_path)
    assert (result.written, result.skipped) == (1, 0)
    out = np.array(Image.open(tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelTrainIds.png"))
    expected = np.full(256, 255)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        expected[label_id] = train_id
    np.testing.assert_array_equal(out, expected[ids])
    assert sorted(set(out.ravel()) - {255}) == list(range(19))

    ds = Cityscapes(tmp_path, "train")
    assert (len(ds), ds.num_classes) == (1, 19)
    np.testing.assert_array_equal(ds[0][1].numpy(), out)
    assert convert_cityscapes(tmp_path, overwrite=False).skipped == 1


def test_cocostuff_converter_and_dataset(tmp_path):
    raw = np.concatenate([np.arange(182), [255]])
    raw = np.resize(raw, (H, W))
    for split in ("train2017", "val2017"):
        _save_image(tmp_path / "images" / split / "000000000009.jpg")
        _save_label(tmp_path / "annotations" / split / "000000000009.png", raw)
    assert convert_cocostuff(tmp_path).written == 2
    out = np.array(Image.open(tmp_path / "annotations/train2017/000000000009_labelTrainIds.png"))
    used = [i for i in range(182) if i not in COCOSTUFF_UNUSED_IDS]
    assert len(used) == 171
    for new, old in enumerate(used):
        assert set(out[raw == old]) == {new}
    for old in (*COCOSTUFF_UNUSED_IDS, 255):
        assert set(out[raw == old]) == {255}
    assert [out[raw == i][0] for i in (0, 10, 11, 12, 181)] == [0, 10, 255, 11, 170]

    ds = COCOStuff(tmp_path, "val")
    assert (len(ds), ds.num_classes) == (1, 171)
    assert int(ds[0][1].max()) == 255 and int(ds[0][1][ds[0][1] != 255].max()) == 170
    assert convert_cocostuff(tmp_path).written == 2  # converted files are not converted again


def test_convert_cli(tmp_path, capsys):
    _save_label(tmp_path / "annotations" / "val2017" / "a.png", np.zeros((4, 4)))
    assert main(["convert", "cocostuff", str(tmp_path), "--workers", "2"]) == 0
    assert re.search(r"cocostuff: wrote 1 \*_labelTrainIds\.png files under .*annotations \(0 existing skipped\)",
                     capsys.readouterr().out)
    assert main(["convert", "cocostuff", str(tmp_path), "--skip-existing"]) == 0
    assert "wrote 0" in capsys.readouterr().out
    assert main(["convert", "cityscapes", str(tmp_path / "nowhere")]) == 2
    assert "label folder does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid not available")
def test_folder_dataset_camvid():
    cfg = dict(type="folder", root=str(CAMVID), classes=11, ignore_index=11)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train), len(val), train.num_classes, train.ignore_index) == (367, 101, 11, 255)
    assert val.verify() == [] and train.verify() == []  # every label in 0..10 or void
    image, label = val.load(0)
    values = set(label.unique().tolist())
    assert values <= set(range(11)) | {255} and 255 in values  # void (11) became 255
    image, label = val[0]
    # 360x480 fits the default (2048, 512) box as 512x683; whole-image test rounds the sides up to 32
    assert image.shape == (3, 512, 704) and label.shape == (360, 480) and label.dtype == torch.int64


# -- errors --------------------------------------------------------------------------------
def test_missing_root_and_split(tmp_path):
    with pytest.raises(DatasetError, match=f"dataset root does not exist: {re.escape(str(tmp_path / 'nope'))}"):
        FolderDataset(tmp_path / "nope", classes=3)
    _folder(tmp_path)
    with pytest.raises(DatasetError, match=f"image folder does not exist: {re.escape(str(tmp_path))}.*images.*val"):
        FolderDataset(tmp_path, "val", classes=4, img_suffix=".png")
    (tmp_path / "images" / "test").mkdir()
    with pytest.raises(DatasetError, match="label folder does not exist: .*annotations.*test"):
        FolderDataset(tmp_path, "test", classes=4, img_suffix=".png")


def test_missing_label_and_empty(tmp_path):
    _folder(tmp_path)
    (tmp_path / "annotations" / "train" / "im1.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 3 images in .* have no label: .*im1\.png \(expected .*im1\.png"):
        FolderDataset(tmp_path, classes=4, img_suffix=".png")
    with pytest.raises(DatasetError, match=r"empty dataset: no '\*\.jpg' images in .*train"):
        FolderDataset(tmp_path, classes=4)  # the images are .png


def test_suffix_hints(tmp_path, caplog):
    """Images under another ending are named: none found says which endings are there; a mix says
    what was left out."""
    _folder(tmp_path)  # three .png images
    with pytest.raises(DatasetError, match=r"no '\*\.jpg' images in .*train \(it holds 3 '\*\.png' files: set data.img_suffix\)"):
        FolderDataset(tmp_path, classes=4)
    _save_image(tmp_path / "images/train/extra.jpg")
    with caplog.at_level("WARNING", logger="edaformer"):
        ds = FolderDataset(tmp_path, classes=4, img_suffix=".png")
    assert len(ds) == 3 and "3 '*.png' images used, 1 '*.jpg' file beside them left out" in caplog.text
    with pytest.raises(DatasetError, match=r"data.palette\) must hold one RGB triple per class: 4 classes"):
        FolderDataset(tmp_path, classes=4, img_suffix=".png", palette=[(0, 0, 0)])


def test_images_of_another_ending_are_counted_once_with_whether_they_have_labels(tmp_path, caplog):
    _folder(tmp_path)  # im0..im2.png, labelled
    for i in range(2):
        _save_image(tmp_path / f"images/train/jpg{i}.jpg")
    caplog.set_level("WARNING", logger="edaformer")
    FolderDataset(tmp_path, classes=4, img_suffix=".png")
    assert "3 '*.png' images used, 2 '*.jpg' files beside them left out (none has a label; data.img_suffix " \
           "selects the images)" in caplog.text
    FolderDataset(tmp_path, classes=4, img_suffix=".png")  # the same folder again: said once
    assert caplog.text.count("left out") == 1
    other = _folder(tmp_path / "other")  # here the .jpg images are labelled too: the setting that takes them is named
    for i in range(2):
        _save_image(other / f"images/train/jpg{i}.jpg")
        _save_label(other / f"annotations/train/jpg{i}.png", _label(4))
    assert len(FolderDataset(other, classes=4, img_suffix=".png")) == 3
    assert "2 '*.jpg' files beside them left out (2 of the '*.jpg' files have a label: data.img_suffix: '.jpg' " \
           "takes them; data.img_suffix selects the images)" in caplog.text


def test_size_mismatch_and_bad_values(tmp_path):
    _folder(tmp_path)
    _save_label(tmp_path / "annotations/train/im0.png", _label(4, h=20, w=30))
    _save_label(tmp_path / "annotations/train/im2.png", np.array([[0, 1], [7, 9]]).repeat(20, 0).repeat(30, 1))
    ds = FolderDataset(tmp_path, classes=4, img_suffix=".png")
    with pytest.raises(DatasetError, match=r"size mismatch: image .*im0\.png is 40x60 but label .*im0\.png is 20x30"):
        ds[0]
    with pytest.raises(DatasetError, match=r"label .*im2\.png has values \[7, 9\] outside \[0, 4\)"):
        ds[2]
    with pytest.raises(DatasetError, match=r"(?s)2 problem\(s\) in 3 samples.*im0\.png.*im2\.png"):
        ds.verify()
    assert len(ds.verify(raise_error=False)) == 2

    _save_label(tmp_path / "annotations/train/im1.png", np.zeros((H, W)))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "annotations/train/im1.png")
    with pytest.raises(DatasetError, match=r"im1\.png is not single-channel"):
        ds[1]


def test_build_dataset_config_errors(tmp_path):
    _folder(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset type 'voc'"):
        build_dataset(dict(type="voc", root=str(tmp_path)), "train")
    with pytest.raises(DatasetError, match="needs 'classes'"):
        build_dataset(dict(type="folder", root=str(tmp_path), img_suffix=".png"), "train")
    with pytest.raises(DatasetError, match="ade20k uses reduce_zero_label=True"):
        build_dataset(dict(type="ade20k", root=str(tmp_path), reduce_zero_label=False), "train")
    with pytest.raises(ValueError, match="split must be"):
        build_dataset(_folder_cfg(tmp_path), "test")


def test_split_lists_and_filters(tmp_path):
    """Holding out by group: several split folders, stem patterns to keep, ``!`` patterns to drop."""
    for split, stems in (("train", ["a_1", "a_2", "b_1", "c_1"]), ("val", ["a_3", "b_2"])):
        for i, stem in enumerate(stems):
            _save_image(tmp_path / "images" / split / f"{stem}.png", seed=i)
            _save_label(tmp_path / "annotations" / split / f"{stem}.png", _label(4, seed=i))
    (tmp_path / "images/train/d_1.png").write_bytes(b"")  # no label, but filtered out: no error

    def stems(ds):
        return sorted(p.stem for p, _ in ds.samples)

    train = build_dataset(_folder_cfg(tmp_path, train_split=["train", "val"], train_filter=["!b_*", "!d_*"]), "train")
    assert stems(train) == ["a_1", "a_2", "a_3", "c_1"]
    val = build_dataset(_folder_cfg(tmp_path, val_split="train", val_filter=["b_*"]), "val")
    assert stems(val) == ["b_1"] and len(val) == 1
    both = FolderDataset(tmp_path, ["train", "val"], classes=4, img_suffix=".png", include=["a_*", "!a_2"])
    assert stems(both) == ["a_1", "a_3"]
    with pytest.raises(DatasetError, match=r"empty dataset: no image in .*images.*val passes the filter \['x_\*'\]"):
        FolderDataset(tmp_path, "val", classes=4, img_suffix=".png", include=["x_*"])
    with pytest.raises(DatasetError, match="1 of 4 images .* have no label: .*d_1"):
        FolderDataset(tmp_path, "train", classes=4, img_suffix=".png", include=["!b_*"])
    with pytest.raises(DatasetError, match="a list of split folders is for 'folder' datasets"):
        build_dataset(dict(type="ade20k", root=str(tmp_path), train_split=["train", "val"]), "train")


def test_split_filter_config_keys():
    from edaformer.config import ConfigError, apply_overrides, validate_config

    base = dict(model=dict(name="edaformer-t-ade20k"), data=dict(type="folder", root="x"), schedule=dict(iters=1))
    cfg = validate_config(apply_overrides(base, ["data.train_split=train,val", "data.train_filter=!0006R0_*",
                                                 "data.val_filter=0006R0_*,0001TP_00*"]))
    data = cfg["data"]
    assert data["train_split"] == ["train", "val"] and data["train_filter"] == ["!0006R0_*"]
    assert data["val_filter"] == ["0006R0_*", "0001TP_00*"]
    assert validate_config({**base, "data": dict(type="folder", root="x", val_filter="a*")})["data"]["val_filter"] == ["a*"]
    with pytest.raises(ConfigError, match="data.train_split must be a name or a list of names"):
        validate_config({**base, "data": dict(type="folder", root="x", train_split=3)})


# -- pipelines ----------------------------------------------------------------------------
_COLORS = torch.tensor([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [145, 30, 180],
                        [70, 240, 240]], dtype=torch.float32)


def _encoded_sample(h: int = 96, w: int = 128, block: int = 8, seed: int = 0):
    """A blocky label and an image whose colour is the label's colour: alignment is checkable."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, len(_COLORS), (h // block, w // block), generator=g)
    label = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
    image = _COLORS[label].permute(2, 0, 1).round().to(torch.uint8)
    return tv_tensors.Image(image), tv_tensors.Mask(label.to(torch.uint8))


def _assert_aligned(image: torch.Tensor, label: torch.Tensor, normalized: bool = True) -> int:
    """Away from label edges and borders (5x5 neighbourhood of one class), the colour must be the label's: the
    colours differ by 100+, a shifted label by a whole colour difference. (A little blending is
    allowed: the nearest resize of labels trails the bilinear one of images by up to half a source
    pixel, as in the reference.)"""
    img = image.float()
    if normalized:
        img = img * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    lab = label.long()
    pad = torch.nn.functional.pad(lab.float(), (2, 2, 2, 2), value=-1.0)  # borders are not checked
    neighbours = torch.stack([pad[i:i + lab.shape[0], j:j + lab.shape[1]] for i in range(5) for j in range(5)])
    interior = (neighbours == lab.float()).all(0) & (lab != 255)
    expected = _COLORS[lab[interior]].T
    err = (img[:, interior] - expected).abs().max().item() if interior.any() else 0.0
    assert err <= 20, f"image and label disagree by {err}"
    return int(interior.sum())


def test_fit_size_matches_reference():
    assert fit_size((360, 480), (2048, 512)) == (512, 683)
    assert fit_size((1024, 2048), (2048, 1024)) == (1024, 2048)
    assert fit_size((1024, 2048), (2048, 1024), 0.5) == (512, 1024)
    assert fit_size((512, 683), (2048, 512), 1.75) == (896, 1195)  # box (3584, 896): short side binds
    assert fit_size((100, 1000), (2048, 512), 1.0) == (205, 2048)  # long side binds


def test_transforms_keep_image_and_label_aligned():
    image, label = _encoded_sample()
    torch.manual_seed(0)
    checked = 0
    for step in (ResizeToFit((256, 192), (0.5, 2.0)), CategoryCappedRandomCrop((64, 80)),
                 PadToSize((200, 200))):
        for _ in range(3):
            img, lab = step(image, label)
            checked += _assert_aligned(img, lab, normalized=False)
    pipeline = train_transforms(scale=(256, 192), crop_size=(64, 80), photometric=False)
    for _ in range(12):
        img, lab = pipeline(image, label)
        assert img.shape == (3, 64, 80) and lab.shape == (64, 80)
        checked += _assert_aligned(img, lab)
    assert checked > 10_000


def test_flip_moves_image_and_label_together():
    image, label = _encoded_sample()
    pipeline = train_transforms(scale=(128, 96), ratio_range=(1.0, 1.0), crop_size=(96, 128), flip_prob=1.0,
                                photometric=False)
    img, lab = pipeline(image, label)
    assert torch.equal(lab, label.flip(-1).long())
    _assert_aligned(img, lab)


def test_padding_with_ignore_when_smaller_than_crop():
    image, label = _encoded_sample(h=40, w=60, block=5)
    pipeline = train_transforms(scale=(60, 40), ratio_range=(1.0, 1.0), crop_size=(64, 80), flip_prob=0.0)
    img, lab = pipeline(image, label)
    assert img.shape == (3, 64, 80) and lab.shape == (64, 80)
    assert (lab[40:] == 255).all() and (lab[:, 60:] == 255).all() and (lab[:40, :60] != 255).all()
    assert (img[:, 40:] == 0).all() and (img[:, :, 60:] == 0).all() and img[:, :40, :60].abs().sum() > 0


def test_crop_cap():
    label = torch.zeros(64, 64, dtype=torch.uint8)
    label[23:41, 23:41] = 1  # 8% class 1, 92% class 0; a 32x32 crop passes the cap when it holds most of it
    image = tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    label = tv_tensors.Mask(label)
    capped, plain = CategoryCappedRandomCrop(32, 0.75), CategoryCappedRandomCrop(32, 1.0)

    def pass_rate(crop):
        torch.manual_seed(0)
        return np.mean([capped.accepts(crop(image, label)[1]) for _ in range(200)])

    assert pass_rate(capped) > 0.95 and pass_rate(plain) < 0.5
    assert not capped.accepts(torch.zeros(8, 8, dtype=torch.uint8))  # one class only
    mixed = torch.tensor([[0, 0, 0, 1], [255, 255, 255, 255]])
    assert capped.accepts(mixed[:1, 2:]) and not capped.accepts(mixed)  # 3/4 is not under 0.75
    assert not capped.accepts(torch.tensor([[0, 255, 255, 255]]))  # ignore pixels do not count
    # impossible cap: still a crop of the right size after the tries run out
    assert capped(image, tv_tensors.Mask(torch.zeros(64, 64, dtype=torch.uint8)))[1].shape == (32, 32)


def _hsv(img: torch.Tensor) -> np.ndarray:
    return np.array([colorsys.rgb_to_hsv(*(px / 255.0)) for px in img.reshape(3, -1).T.double().numpy()])


def test_photometric_distortion():
    torch.manual_seed(0)
    img = tv_tensors.Image(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(8, 8, dtype=torch.uint8))
    pmd = PhotoMetricDistortion()
    for _ in range(10):
        out, m = pmd(img, mask)
        assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 255 and m is mask
    none = dict(brightness=None, contrast_first=True, contrast=None, saturation=None, hue=None)
    torch.testing.assert_close(pmd.transform(img, none), img.float())
    torch.testing.assert_close(pmd.transform(img, {**none, "brightness": 20.0}), (img.float() + 20).clamp(0, 255))
    torch.testing.assert_close(pmd.transform(img, {**none, "contrast": 1.3}), (img.float() * 1.3).clamp(0, 255))
    for factor in (0.5, 1.5):
        sat = pmd.transform(img, {**none, "saturation": factor})
        ref, got = _hsv(img), _hsv(sat)
        np.testing.assert_allclose(got[:, 1], np.clip(ref[:, 1] * factor, 0, 1), atol=1e-4)
        np.testing.assert_allclose(got[:, 2], ref[:, 2], atol=1e-4)
    hue = pmd.transform(img, {**none, "hue": 9})  # 9 OpenCV units = 18 degrees
    ref, got = _hsv(img), _hsv(hue)
    coloured = ref[:, 1] > 0.1
    dh = (got[coloured, 0] - ref[coloured, 0]) % 1.0
    np.testing.assert_allclose(dh, 18 / 360, atol=2e-3)


# -- builder and loader -------------------------------------------------------------------
def test_train_and_val_items(tmp_path):
    _folder(tmp_path, "train")
    _folder(tmp_path, "val")
    torch.manual_seed(0)
    image, label = build_dataset(_folder_cfg(tmp_path, batch_size=2, workers=0), "train")[0]  # loader keys pass
    assert (image.shape, image.dtype, label.shape, label.dtype) == ((3, 512, 512), torch.float32, (512, 512),
                                                                   torch.int64)
    assert type(image) is torch.Tensor and type(label) is torch.Tensor
    assert set(label.unique().tolist()) <= {0, 1, 2, 3, 255}
    image, label = build_dataset(_folder_cfg(tmp_path, crop_size=(32, 48)), "train")[1]
    assert image.shape == (3, 32, 48) and label.shape == (32, 48)

    val = build_dataset(_folder_cfg(tmp_path), "val")
    image, label = val[0]
    assert (image.shape, image.dtype, label.shape, label.dtype) == ((3, 512, 768), torch.float32, (H, W),
                                                                   torch.int64)
    np.testing.assert_array_equal(label.numpy(), _label(4, seed=0))  # original size and values
    small = build_dataset(_folder_cfg(tmp_path, scale=(120, 80)), "val")
    assert small[0][0].shape == (3, 96, 128)  # 80x120, sides rounded up to multiples of 32
    images, labels = collate([val[0], small[1]])  # test items of different sizes
    assert [i.shape[-1] for i in images] == [768, 128] and [t.shape for t in labels] == [(H, W)] * 2


def test_loader_reproducible(tmp_path):
    _folder(tmp_path, n=4)
    ds = build_dataset(_folder_cfg(tmp_path, crop_size=(24, 24), scale=(120, 80)), "train")

    def batches(seed, workers):
        torch.manual_seed(123)
        loader = build_dataloader(ds, batch_size=2, shuffle=True, workers=workers, seed=seed, drop_last=True)
        return [torch.cat([x.flatten(), y.flatten().float()]) for x, y in loader]

    first = batches(0, 2)
    assert len(first) == 2
    assert all(torch.equal(a, b) for a, b in zip(first, batches(0, 2)))
    assert not all(torch.equal(a, b) for a, b in zip(first, batches(1, 2)))
    assert all(torch.equal(a, b) for a, b in zip(batches(0, 0), batches(0, 0)))


def test_distributed_loader(tmp_path):
    import torch.distributed as dist

    _folder(tmp_path, n=4)
    ds = build_dataset(_folder_cfg(tmp_path, crop_size=(16, 16), scale=(60, 40)), "train")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = build_dataloader(ds, batch_size=2, shuffle=True, workers=0, distributed=True, seed=3)
        assert type(loader.sampler).__name__ == "DistributedSampler" and loader.sampler.seed == 3
        assert sum(x.shape[0] for x, _ in loader) == 4
    finally:
        dist.destroy_process_group()
