"""Class names and palettes of the known datasets (``edaformer.data.palettes``)."""
import dataclasses

import pytest

from edaformer.data.palettes import DATASET_INFO, DatasetInfo, get_dataset_info, make_palette
from edaformer.models import MODEL_SPECS


@pytest.mark.parametrize("name,n", [("ade20k", 150), ("cityscapes", 19), ("cocostuff", 171), ("camvid", 11)])
def test_dataset_info_sizes(name, n):
    info = get_dataset_info(name)
    assert isinstance(info, DatasetInfo)
    assert len(info.classes) == len(info.palette) == n
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in info.palette)
    assert len(set(info.classes)) == n


def test_dataset_info_values():
    assert DATASET_INFO["cityscapes"].classes[0] == "road"
    assert DATASET_INFO["cityscapes"].palette[0] == (128, 64, 128)
    assert DATASET_INFO["ade20k"].classes[:3] == ("wall", "building", "sky")
    assert DATASET_INFO["ade20k"].palette[0] == (120, 120, 120)
    assert DATASET_INFO["cocostuff"].classes[0] == "person" and DATASET_INFO["cocostuff"].classes[-1] == "wood"
    assert DATASET_INFO["camvid"].classes == ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
                                              "Fence", "Car", "Pedestrian", "Bicyclist")
    for spec in MODEL_SPECS.values():  # every model's dataset is known, with its class count
        assert len(get_dataset_info(spec.dataset).classes) == spec.num_classes


def test_dataset_info_unknown_and_frozen():
    with pytest.raises(ValueError, match="unknown dataset 'voc'"):
        get_dataset_info("voc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        DATASET_INFO["camvid"].classes = ()


def test_make_palette():
    pal = make_palette(300)
    assert len(pal) == 300 and len(set(pal)) == 300
    assert pal == make_palette(300) and pal[:5] == make_palette(5)
    assert make_palette(0) == ()
    with pytest.raises(ValueError):
        make_palette(-1)


def test_class_info_prefers_given_then_dataset_then_generated():
    from edaformer.data.palettes import class_info

    ade = class_info(150, "ade20k")
    assert ade == DATASET_INFO["ade20k"]
    assert class_info(3, "ade20k").classes == ("class_0", "class_1", "class_2")   # ADE20K has 150 classes
    given = class_info(2, "ade20k", classes=["a", "b"], palette=[[1, 2, 3], [4, 5, 6]])
    assert given.classes == ("a", "b") and given.palette == ((1, 2, 3), (4, 5, 6))
    assert class_info(2, None, classes=["only one"]).classes == ("class_0", "class_1")
    assert class_info(4, "no such dataset").palette == make_palette(4)
