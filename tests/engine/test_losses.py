import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edaformer.config import ConfigError, load_config
from edaformer.engine.losses import (SegmentationLoss, build_loss, class_pixel_counts, median_frequency_weights,
                                     ohem_keep_mask, segmentation_loss)
from tests.helpers.training_data import make_dataset, write_config


def _batch(seed=0, n=2, c=3, h=6, w=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g)
    labels = torch.randint(0, c, (n, h, w), generator=g)
    labels[0, 0] = 255
    return logits, labels


def test_plain_ce_is_segmentation_loss():
    logits, labels = _batch()
    assert SegmentationLoss("ce")(logits, labels) == segmentation_loss(logits, labels)


def test_class_weighted_ce_sums_weighted_pixels_over_all_pixels():
    logits, labels = _batch()
    w = torch.tensor([1.0, 3.0, 0.5])
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    pixel_weight = w[labels.clamp(max=2)] * (labels != 255)
    expected = (per_pixel * pixel_weight).sum() / labels.numel()
    assert SegmentationLoss("ce", class_weight=w.tolist())(logits, labels).item() == pytest.approx(expected.item())


def test_ohem_keeps_hard_pixels_and_at_least_min_kept():
    logits, labels = _batch(n=1, h=10, w=10)
    prob = logits.softmax(1).gather(1, labels.clamp(max=2).unsqueeze(1)).squeeze(1)
    valid = labels != 255
    keep = ohem_keep_mask(logits, labels, thresh=0.7, min_kept=1)
    assert torch.equal(keep, valid & (prob < 0.7))
    # min_kept above the number of hard pixels: the k hardest are kept (k = min_kept * batch)
    keep = ohem_keep_mask(logits, labels, thresh=0.0, min_kept=20)
    assert int(keep.sum()) == 20
    hardest = prob[valid].sort().values[:20]
    assert torch.equal(prob[keep].sort().values, hardest)
    # the loss is CE over the kept pixels divided by all pixels
    loss = SegmentationLoss("ohem", ohem_thresh=0.0, ohem_min_kept=20)(logits, labels)
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    assert loss.item() == pytest.approx((per_pixel * keep).sum().item() / labels.numel())
    assert SegmentationLoss("ohem")(logits, torch.full_like(labels, 255)).item() == 0.0


def test_median_frequency_weights():
    assert median_frequency_weights([10, 30, 60]) == pytest.approx([3.0, 1.0, 0.5])
    # an absent class gets the largest present weight
    assert median_frequency_weights([10, 0, 30])[1] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no labelled pixel"):
        median_frequency_weights([0, 0])


def test_class_pixel_counts_and_median_freq_from_the_dataset(tmp_path):
    root = make_dataset(tmp_path / "data", n=3, size=16, seed=0)
    cfg = load_config(write_config(tmp_path / "cfg.yaml", root, size=16), [])
    from edaformer.engine.builders import build_datasets

    train_set, _ = build_datasets(cfg["data"])
    counts = class_pixel_counts(train_set)
    brute = np.zeros(train_set.num_classes, dtype=np.int64)
    for i in range(len(train_set)):
        m = np.asarray(train_set.load(i)[1]).reshape(-1)
        brute += np.bincount(m[m < train_set.num_classes], minlength=train_set.num_classes)
    assert counts.tolist() == brute.tolist()
    loss = build_loss({"name": "ce", "class_weight": "median_freq"}, train_set)
    assert loss.class_weight.tolist() == pytest.approx(median_frequency_weights(counts), rel=1e-6)
    with pytest.raises(ValueError, match="2 values but the dataset has"):
        build_loss({"class_weight": [1.0, 2.0]}, train_set)


def test_loss_config_keys(tmp_path):
    root = make_dataset(tmp_path / "data", n=2, size=16, seed=0)
    path = write_config(tmp_path / "cfg.yaml", root, size=16)
    cfg = load_config(path, ["loss.name=ohem", "loss.class_weight=median_freq"])
    assert cfg["loss"] == {"name": "ohem", "class_weight": "median_freq", "ohem_thresh": 0.7, "ohem_min_kept": 100000}
    assert load_config(path, ["loss.class_weight=1,2.5,3"])["loss"]["class_weight"] == [1.0, 2.5, 3.0]
    with pytest.raises(ConfigError, match="loss.name"):
        load_config(path, ["loss.name=focal"])
    with pytest.raises(ConfigError, match="loss.class_weight"):
        load_config(path, ["loss.class_weight=-1,2"])


@pytest.mark.parametrize("overrides", [["loss.name=ohem", "loss.ohem_min_kept=10"], ["loss.class_weight=median_freq"]])
def test_training_runs_with_each_loss(tmp_path, overrides, one_thread):
    from edaformer.engine import train

    root = make_dataset(tmp_path / "data", n=2, size=32, seed=0)
    cfg = load_config(write_config(tmp_path / "cfg.yaml", root, schedule={"iters": 2, "warmup_iters": 1}), overrides)
    train(cfg, tmp_path / "work")
    records = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
