"""docs/own-data.md works as written: its minimal config (no _base_) trains and evaluates on a
4-class folder dataset made from a few CamVid frames."""
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from edaformer.cli import main
from edaformer.config import load_config
from tests.helpers.training_data import CAMVID, REPO

DOC = REPO / "docs" / "own-data.md"
# CamVid ids -> the doc's classes [background, road, car, person]; void (11) -> 255
TO_FOUR = np.array([0, 0, 0, 1, 0, 0, 0, 0, 2, 3, 3, 255] + [255] * 244, np.uint8)


def _doc_config() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    return next(b for b in blocks if "type: folder" in b)


def _four_class_camvid(root, size=(120, 90)):
    """Two training and two validation frames of CamVid, at 120x90, labels in four classes."""
    for split, source in (("train", "train"), ("val", "val")):
        for image in sorted((CAMVID / "images" / source).glob("*.jpg"))[:2]:
            label = CAMVID / "annotations" / source / f"{image.stem}.png"
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.open(image).resize(size, Image.BILINEAR).save(root / "images" / split / image.name)
            ids = np.asarray(Image.open(label).resize(size, Image.NEAREST))
            Image.fromarray(TO_FOUR[ids]).save(root / "annotations" / split / label.name)
    return root


def test_the_minimal_config_has_no_base_and_loads():
    text = _doc_config()
    assert "_base_" not in text
    raw = yaml.safe_load(text)
    assert raw["data"]["classes"] == ["background", "road", "car", "person"] and raw["data"]["type"] == "folder"


@pytest.mark.skipif(not CAMVID.is_dir(), reason="CamVid not available")
def test_the_minimal_config_trains_and_evaluates(tmp_path, capsys):
    data = _four_class_camvid(tmp_path / "my-data")
    config = tmp_path / "my-data.yaml"
    config.write_text(_doc_config().replace("/data/my-data", str(data)))
    small = ["data.scale=120,90", "data.crop_size=64", "data.batch_size=2", "data.workers=0",
             "schedule.iters=2", "schedule.warmup_iters=1"]
    cfg = load_config(config, small)
    assert cfg["model"]["num_classes"] is None and cfg["data"]["ignore_index"] == 255
    work = tmp_path / "work"
    assert main(["train", str(config), "--work-dir", str(work), "--device", "cpu", "--set", *small]) == 0
    assert (work / "best_mIoU.pth").is_file() and (work / "iter_2.pth").is_file()
    written = load_config(work / "config.yaml")
    assert written["model"]["num_classes"] == 4 and written["data"]["test_scale"] == [120, 90]
    assert main(["eval", str(work / "config.yaml"), "--checkpoint", str(work / "best_mIoU.pth"),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and all(name in out for name in ("background", "road", "car", "person"))
