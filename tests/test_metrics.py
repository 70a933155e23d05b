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


# 3 classes, every class labelled and predicted. Pairs (label -> pred): 0->0, 0->1, 1->1, 1->2, 2->2;
# the ignored pixel is predicted 0 and must not count.
LABEL_C = _img([[0, 0, 1],
                [1, 2, IGN]])
PRED_C = _img([[0, 1, 1],
               [2, 2, 0]])


def test_dice_precision_recall_by_hand():
    metric = SegMetric(3, IGN)
    metric.update(PRED_C, LABEL_C)
    out = metric.compute()
    # intersection [1, 1, 1], label area [2, 2, 1], predicted area [1, 2, 2]
    assert out["Dice"] == pytest.approx([2 / 3, 2 / 4, 2 / 3])
    assert out["Precision"] == pytest.approx([1 / 1, 1 / 2, 1 / 2])
    assert out["Recall"] == pytest.approx([1 / 2, 1 / 2, 1 / 1])
    assert out["mDice"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert out["mPrec"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert out["mRecall"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3) == out["mAcc"]
    # Dice = 2 IoU / (1 + IoU) per class
    assert out["Dice"] == pytest.approx([2 * v / (1 + v) for v in out["IoU"]])


def test_dice_precision_recall_nan_classes():
    # class 1 is labelled but never predicted, class 2 is absent from both
    metric = SegMetric(3, IGN)
    metric.update(_img([[0, 0, 0, 0]]), _img([[0, 0, 1, 1]]))
    out = metric.compute()
    assert out["Dice"][:2] == pytest.approx([4 / 6, 0.0]) and math.isnan(out["Dice"][2])
    assert out["Recall"][:2] == pytest.approx([1.0, 0.0]) and math.isnan(out["Recall"][2])
    assert out["Precision"][0] == pytest.approx(2 / 4)
    assert math.isnan(out["Precision"][1]) and math.isnan(out["Precision"][2])  # never predicted: 0 / 0
    assert out["mDice"] == pytest.approx((4 / 6 + 0.0) / 2)      # NaN classes left out of the means
    assert out["mRecall"] == pytest.approx(0.5)
    assert out["mPrec"] == pytest.approx(0.5)


def test_confusion_matrix_equals_a_brute_force_count():
    torch.manual_seed(0)
    pred = torch.randint(0, 4, (3, 6, 5))
    label = torch.randint(0, 5, (3, 6, 5))
    label[label == 4] = IGN
    metric = SegMetric(4, IGN)
    metric.update(pred, label)
    expected = [[0] * 4 for _ in range(4)]
    for t, p in zip(label.flatten().tolist(), pred.flatten().tolist()):
        if t != IGN:
            expected[t][p] += 1  # rows: label, columns: prediction
    assert metric.confusion.tolist() == expected
    out = metric.compute()
    assert out["confusion"] == expected
    by_hand = SegMetric(3, IGN)
    by_hand.update(PRED_C, LABEL_C)
    assert by_hand.compute()["confusion"] == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_formatting_shows_dice_precision_recall():
    metric = SegMetric(3, IGN)
    metric.update(PRED_C, LABEL_C)
    out = metric.compute()
    line = format_metrics(out)
    assert "mDice 61.11" in line and "mPrec 66.67" in line and "mRecall 66.67" in line
    table = format_class_table(out, ["road", "sky", "car"]).splitlines()
    assert table[0].split("|")[2:6] == ["    IoU ", "   Dice ", "   Prec ", " Recall "]
    assert table[2].split("|")[1:6] == [" road  ", "  50.00 ", "  66.67 ", " 100.00 ", "  50.00 "]
    assert table[-1].split("|")[3:6] == ["  61.11 ", "  66.67 ", "  66.67 "]
