"""Segmentation metrics (mmseg definitions) against hand-computed counts."""
import math

import pytest
import torch

from edaformer.metrics import SegMetric, format_class_table, format_metrics, intersect_and_union

IGN = 255


def _img(rows):
    return torch.tensor(rows, dtype=torch.int64)


# 4 classes. Class 3 never appears (labels or predictions); class 2 is predicted but never labelled.
LABEL_A = _img([[0, 0, 1, 1],
                [0, 0, 1, 1],
                [IGN, IGN, 1, 0]])
PRED_A = _img([[0, 1, 1, 1],
               [0, 0, 2, 1],
               [2, 2, 1, 1]])
LABEL_B = _img([[1, 1],
                [0, IGN]])
PRED_B = _img([[1, 0],
               [0, 0]])  # the ignored pixel is predicted 0: it must not count


def test_intersect_and_union_by_hand():
    inter, union, area_pred, area_label = intersect_and_union(PRED_A, LABEL_A, 4, IGN)
    # valid pixels (label != 255): 10. Pairs (label -> pred):
    # 0->0 x3, 0->1 x1 (row0 col1), 0->1 x1 (row2 col3); 1->1 x4, 1->2 x1 (row1 col2)
    assert inter.tolist() == [3, 4, 0, 0]
    assert area_label.tolist() == [5, 5, 0, 0]
    assert area_pred.tolist() == [3, 6, 1, 0]
    assert union.tolist() == [5, 7, 1, 0]


def test_segmetric_dataset_sums_and_nan_class():
    metric = SegMetric(4, IGN)
    metric.update(PRED_A, LABEL_A)
    metric.update(PRED_B, LABEL_B)
    out = metric.compute()
    # image B: 1->1, 1->0, 0->0 (the ignored pixel is dropped)
    inter = [3 + 1, 4 + 1, 0, 0]
    label = [5 + 1, 5 + 2, 0, 0]
    pred = [3 + 2, 6 + 1, 1, 0]
    union = [label[k] + pred[k] - inter[k] for k in range(4)]
    assert out["IoU"][0] == pytest.approx(inter[0] / union[0])
    assert out["IoU"][1] == pytest.approx(inter[1] / union[1])
    assert out["IoU"][2] == 0.0                     # predicted, never labelled: counts as 0
    assert math.isnan(out["IoU"][3])                # absent from both: NaN ...
    assert out["mIoU"] == pytest.approx((4 / 7 + 5 / 9 + 0.0) / 3)  # ... and left out of the mean
    assert out["Acc"][:2] == pytest.approx([4 / 6, 5 / 7])
    assert math.isnan(out["Acc"][2]) and math.isnan(out["Acc"][3])
    assert out["mAcc"] == pytest.approx((4 / 6 + 5 / 7) / 2)
    assert out["aAcc"] == pytest.approx(9 / 13)
    assert out["num_images"] == 2


def test_batch_update_equals_per_image():
    torch.manual_seed(0)
    pred = torch.randint(0, 5, (3, 7, 9))
    label = torch.randint(0, 5, (3, 7, 9))
    label[label == 4] = IGN
    a, b = SegMetric(5), SegMetric(5)
    a.update(pred, label)
    for p, t in zip(pred, label):
        b.update(p, t)
    assert torch.equal(a.totals, b.totals)
    a.reset()
    assert a.totals.sum() == 0 and a.num_images == 0


def test_perfect_prediction_and_errors():
    label = _img([[0, 1], [2, IGN]])
    pred = label.clone()
    pred[1, 1] = 1
    metric = SegMetric(3)
    metric.update(pred, label)
    out = metric.compute()
    assert out["aAcc"] == out["mIoU"] == out["mAcc"] == 1.0
    with pytest.raises(ValueError, match="class indices, not logits"):
        metric.update(torch.randn(1, 3, 2, 2), label[None])
    with pytest.raises(ValueError, match="outside"):
        metric.update(pred, _img([[0, 7], [1, 1]]))
    with pytest.raises(ValueError, match="shape"):
        metric.update(pred, label[:1])


def test_formatting():
    metric = SegMetric(4)
    metric.update(PRED_A, LABEL_A)
    out = metric.compute()
    table = format_class_table(out, ["road", "sky", "car", "bus"])
    assert "| road" in table and "bus" in table and "nan" in table and "| mean" in table
    assert format_metrics(out).startswith("aAcc ")
    with pytest.raises(ValueError):
        format_class_table(out, ["a"])
