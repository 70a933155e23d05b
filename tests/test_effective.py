"""The effective config: the keys a config leaves unset, filled with the values a run uses."""
from pathlib import Path

from edaformer.config import load_config, validate_config
from edaformer.data.palettes import make_palette
from edaformer.effective import effective_config
from edaformer.engine.state import check_resume_config


def _folder_config(**data):
    return validate_config({"model": {"name": "edaformer-t-ade20k"},
                            "data": {"type": "folder", "root": "r", "classes": 4, **data},
                            "schedule": {"iters": 10}})


def test_unset_keys_get_the_values_used():
    """A folder config that sets no pipeline key runs at ADE20K's protocol: the 2048x512 box, crop
    512, stride 341, sides to multiples of 32; the class names, palette and model defaults too."""
    cfg = _folder_config()
    assert "scale" not in cfg["data"] and cfg["eval"]["crop_size"] is None and cfg["model"]["num_classes"] is None
    used = effective_config(cfg)
    data, model, ev = used["data"], used["model"], used["eval"]
    assert (data["scale"], data["test_scale"], data["crop_size"], data["size_divisor"]) == \
        ([2048, 512], [2048, 512], [512, 512], 32)
    assert (data["ratio_range"], data["cat_max_ratio"], data["flip_prob"], data["photometric"]) == \
        ([0.5, 2.0], 0.75, 0.5, True)
    assert (data["img_suffix"], data["seg_suffix"], data["train_split"], data["val_split"]) == \
        (".jpg", ".png", "train", "val")
    assert data["classes"] == ["class_0", "class_1", "class_2", "class_3"] and data["reduce_zero_label"] is False
    assert data["palette"] == [list(c) for c in make_palette(4)] and data["train_filter"] is None
    assert (ev["crop_size"], ev["stride"], ev["flops_input_size"], ev["isr"]) == ([512, 512], [341, 341],
                                                                                  [512, 512], None)
    assert (model["num_classes"], model["decoder_depths"], model["decoder_op"], model["train_isr"]) == \
        (4, [3, 2, 1], "efa", "1111-111")
    assert list(data)[:5] == ["type", "root", "ignore_index", "batch_size", "workers"]  # the key table's order
    assert validate_config(used) == used and effective_config(used) == used
    # set keys are kept; the test box follows a set scale
    mine = effective_config(_folder_config(scale=[640, 480], crop_size=256, size_divisor=None))
    assert (mine["data"]["test_scale"], mine["eval"]["crop_size"], mine["eval"]["stride"]) == \
        ([640, 480], [256, 256], [170, 170])


def test_named_datasets_and_shipped_configs():
    city = effective_config(load_config("edaformer-b-cityscapes"))["data"]
    assert (city["img_suffix"], city["seg_suffix"], len(city["classes"]), city["size_divisor"]) == \
        ("_leftImg8bit.png", "_gtFine_labelTrainIds.png", 19, None)
    ade = effective_config(load_config("edaformer-t-ade20k"))["data"]
    assert ade["reduce_zero_label"] is True and ade["train_split"] == "training" and len(ade["palette"]) == 150
    for name in ("edaformer-t-camvid", "ablations/edaformer-t-camvid-heldout", "ablations/segformer-b0-camvid"):
        used = effective_config(load_config(name))
        assert validate_config(used) == used, name


def test_a_resume_from_the_written_config_is_no_change():
    """The work dir's config.yaml (every value written out) resumes a checkpoint whose config left them unset."""
    cfg = _folder_config()
    ckpt = {"iteration": 2, "config": cfg}
    assert check_resume_config(ckpt, effective_config(cfg), Path("iter_2.pth")) == []
    changed = _folder_config(crop_size=256)  # a real change is one line, not one per value that follows it
    assert check_resume_config(ckpt, changed, Path("iter_2.pth")) == ["data.crop_size: None -> [256, 256]"]
