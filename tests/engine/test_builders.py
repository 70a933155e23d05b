"""Optimizer parameter groups, the warmup + poly schedule and the loss."""
import pytest
import torch

import edaformer
from edaformer.engine import WarmupPolyLR, build_optimizer, build_param_groups, build_scheduler, segmentation_loss


def test_schedule_values():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-5)
    sched = build_scheduler(opt, dict(iters=100, warmup_iters=10, warmup_ratio=1e-6, power=1.0, min_lr=0.0))
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(6e-5 * 1e-6)                     # warmup start
    assert lrs[5] == pytest.approx(6e-5 * 0.95 * (1 - 0.5 * (1 - 1e-6)))  # linear warmup on top of poly
    assert lrs[10] == pytest.approx(6e-5 * 0.9)                      # end of warmup: plain poly
    assert lrs[55] == pytest.approx(6e-5 * 0.45)
    assert lrs[100] == 0.0                                           # poly end
    f = WarmupPolyLR(1.0, 100, warmup_iters=0, power=2.0, min_lr=0.1)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.9 * 0.25 + 0.1) and f(100) == pytest.approx(0.1)


def test_param_groups():
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=4)
    groups = build_param_groups(model, lr=6e-5, weight_decay=0.01, decoder_lr_mult=10)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"encoder", "encoder_no_decay", "decoder", "decoder_no_decay"}
    assert by_name["encoder"]["lr"] == by_name["encoder_no_decay"]["lr"] == 6e-5
    assert by_name["decoder"]["lr"] == by_name["decoder_no_decay"]["lr"] == pytest.approx(6e-4)
    assert by_name["encoder"]["weight_decay"] == by_name["decoder"]["weight_decay"] == 0.01
    assert by_name["encoder_no_decay"]["weight_decay"] == by_name["decoder_no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert no_decay == model.no_weight_decay()
    assert "decoder.fuse.bn.weight" in no_decay and "encoder.stages.0.norm.bias" in no_decay
    assert "decoder.classifier.bias" not in no_decay                  # only normalization parameters
    assert all(names[id(p)].startswith("decoder.") for p in by_name["decoder"]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = build_optimizer(model, dict(lr=6e-5, betas=[0.9, 0.999], weight_decay=0.01, decoder_lr_mult=10))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 4


def test_segmentation_loss_ignore():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0] = 255
    full = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none").sum() / labels.numel()
    assert segmentation_loss(logits, labels) == pytest.approx(full.item())
    assert segmentation_loss(logits, torch.full_like(labels, 255)) == 0.0


def test_segmentation_loss_keeps_float64_and_promotes_half():
    logits = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (1, 4, 4))
    assert segmentation_loss(logits, labels).dtype == torch.float64
    assert segmentation_loss(logits.to(torch.bfloat16), labels).dtype == torch.float32
