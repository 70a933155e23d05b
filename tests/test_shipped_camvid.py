"""The model shipped in the package: ``edaformer-t-camvid`` (fp16 safetensors, trained on CamVid)."""

import numpy as np
import pytest
from PIL import Image

import edaformer
from edaformer import pretrained
from edaformer.cli import main as cli_main
from edaformer.data.palettes import get_dataset_info
from tests.helpers.training_data import CAMVID

NAME = "edaformer-t-camvid"

pytestmark = pytest.mark.skipif(NAME not in pretrained.list_pretrained(), reason=f"{NAME} is not shipped in this checkout")


def test_shipped_model_metadata_round_trips():
    model, info = edaformer.load_pretrained(NAME)
    camvid = get_dataset_info("camvid")
    assert info.model == "edaformer-t-ade20k" and info.num_classes == 11 == model.num_classes
    assert tuple(info.classes) == camvid.classes and tuple(map(tuple, info.palette)) == camvid.palette
    assert info.config["data"]["crop_size"] == [352, 352] and info.config["model"]["num_classes"] == 11
    assert edaformer.parse_isr(info.isr) is not None and info.isr_pool == "avg"
    assert info.protocol.scale == (960, 360) and info.mIoU is not None and info.mIoU > 0.55
    assert not model.training and next(model.parameters()).dtype.is_floating_point
    segmenter = edaformer.Segmenter.pretrained()
    assert segmenter.classes == camvid.classes and str(segmenter.model.isr) == str(info.isr)


def _street_frame() -> tuple[np.ndarray, np.ndarray]:
    """The first val frame whose labels have sky at the top centre and road at the bottom centre."""
    for label_path in sorted((CAMVID / "annotations" / "val").glob("*.png")):
        label = np.asarray(Image.open(label_path))
        h, w = label.shape
        top, bottom = label[: h // 10, w // 3: 2 * w // 3], label[-h // 8:, w // 3: 2 * w // 3]
        if (top == 0).mean() > 0.9 and (bottom == 3).mean() > 0.9:
            image = np.asarray(Image.open(CAMVID / "images" / "val" / f"{label_path.stem}.jpg").convert("RGB"))
            return image, label
    pytest.skip("no CamVid val frame with sky at the top and road at the bottom")


@pytest.mark.skipif(not CAMVID.is_dir(), reason="the CamVid dataset is not in ../shared/datasets/camvid")
def test_shipped_model_sees_road_below_and_sky_above(tmp_path, one_thread):
    image, label = _street_frame()
    pred = edaformer.Segmenter.pretrained()(image)
    h, w = label.shape
    assert pred.shape == label.shape
    top, bottom = pred[: h // 10, w // 3: 2 * w // 3], pred[-h // 8:, w // 3: 2 * w // 3]
    assert (top == 0).mean() > 0.8, "sky (class 0) at the top centre"
    assert (bottom == 3).mean() > 0.8, "road (class 3) at the bottom centre"
    labelled = label < 11
    assert (pred[labelled] == label[labelled]).mean() > 0.85

    # the command line with no model and no checkpoint uses the same shipped model
    Image.fromarray(image).save(tmp_path / "street.png")
    assert cli_main(["predict", str(tmp_path / "street.png"), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "street_label.png"))
    assert written.shape == label.shape and written.max() <= 10
    assert (tmp_path / "out" / "street_overlay.png").is_file()
    assert np.array_equal(written, pred)
