"""The training state, its checkpoint payload, resume-checkpoint selection and the resume config check."""
import copy
import os

import pytest
import torch

import edaformer
from edaformer.engine import (ResumeConfigError, TrainState, build_optimizer, build_scheduler, checkpoint_payload,
                              find_resume_checkpoint)
from edaformer.engine.state import check_resume_config

OPTIM = dict(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01, decoder_lr_mult=10.0)
SCHEDULE = dict(iters=10, warmup_iters=0, warmup_ratio=1e-6, power=1.0, min_lr=0.0)


def test_find_resume_checkpoint(tmp_path, caplog):
    for n in (2, 4):
        edaformer.save_checkpoint({"iteration": n, "state_dict": {"w": torch.zeros(1)}}, tmp_path / f"iter_{n}.pth")
    os.link(tmp_path / "iter_2.pth", tmp_path / "latest.pth")      # stale: stopped before updating it
    (tmp_path / "iter_6.pth").write_bytes(b"truncated")
    path, ckpt = find_resume_checkpoint(tmp_path)
    assert path.name == "iter_4.pth" and ckpt["iteration"] == 4
    assert "skipping checkpoint" in caplog.text and "iter_6.pth" in caplog.text
    assert find_resume_checkpoint(tmp_path / "empty") is None


def _state(lr: float = 1e-3, iters: int = 10, impl: str = "auto") -> TrainState:
    torch.manual_seed(0)
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=3)
    optimizer = build_optimizer(model, {**OPTIM, "lr": lr, "impl": impl})
    return TrainState(model, optimizer, build_scheduler(optimizer, {**SCHEDULE, "iters": iters}),
                      torch.amp.GradScaler("cuda", enabled=False))


def _step(state: TrainState) -> None:
    state.model.train()
    loss = state.model(torch.randn(1, 3, 32, 32)).square().mean()
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    state.iteration += 1


def test_payload_round_trip_takes_hyper_parameters_from_the_config():
    """Moments, schedule position and counters come from the checkpoint; lr and the schedule's
    shape from the config the state was built with."""
    a = _state()
    for _ in range(3):
        _step(a)
    a.best_miou = 0.25
    payload = checkpoint_payload(a.model, {"iteration": 3}, a, config={"optim": OPTIM})
    assert payload["iteration"] == 3 and payload["config"] == {"optim": OPTIM} and payload["meta"] == {"iteration": 3}
    assert payload["format"] == "edaformer" and payload["num_classes"] == 3
    same = _state()
    same.load_state_dict(payload)
    assert same.iteration == 3 and same.best_miou == 0.25
    assert [g["lr"] for g in same.optimizer.param_groups] == [g["lr"] for g in a.optimizer.param_groups]
    changed = _state(lr=2e-3, iters=20)
    changed.load_state_dict(payload)
    assert changed.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * (1 - 3 / 20))   # new lr, new iters
    assert changed.scheduler.base_lrs[0] == 2e-3 and changed.scheduler.last_epoch == 3
    first = next(iter(a.optimizer.state.values()))
    assert torch.equal(next(iter(changed.optimizer.state.values()))["exp_avg"], first["exp_avg"])
    only_model = checkpoint_payload(a.model, {"mIoU": 0.5})
    assert "optimizer" not in only_model and "config" not in only_model


def _fixed_steps(state: TrainState, steps: range) -> None:
    """Optimizer steps on given gradients (a model's own would amplify rounding differences)."""
    for i in steps:
        g = torch.Generator().manual_seed(i)
        for p in state.model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 10.0 ** -(i % 4)
        state.optimizer.step()
        state.scheduler.step()
        state.iteration += 1


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sb = b.state_dict()
    return max((v - sb[k]).abs().max().item() for k, v in a.state_dict().items() if v.is_floating_point())


def test_adamw_implementations_make_the_same_update_and_resume_each_other():
    """optim.impl loop / foreach / fused: the same update up to rounding; a checkpoint written
    with one continues with another (the step counts move to where that one keeps them)."""
    runs = {impl: _state(impl=impl) for impl in ("loop", "foreach", "fused")}
    assert runs["fused"].optimizer.param_groups[0]["fused"] and runs["foreach"].optimizer.param_groups[0]["foreach"]
    assert runs["loop"].optimizer.param_groups[0]["foreach"] is False
    for state in runs.values():
        _fixed_steps(state, range(3))
    assert _max_diff(runs["loop"].model, _state().model) > 1e-3
    for impl in ("foreach", "fused"):
        assert _max_diff(runs["loop"].model, runs[impl].model) < 1e-6
    payload = copy.deepcopy(checkpoint_payload(runs["loop"].model, {"iteration": 3}, runs["loop"]))
    _fixed_steps(runs["loop"], range(3, 5))
    for impl in ("fused", "foreach"):
        other = _state(impl=impl)
        other.load_state_dict(copy.deepcopy(payload))  # the optimizer keeps (and counts on) the payload's step tensors
        assert other.optimizer.param_groups[0][impl] is True and other.iteration == 3
        _fixed_steps(other, range(3, 5))
        assert _max_diff(runs["loop"].model, other.model) < 1e-6


def _cfg(**changes):
    cfg = {"model": {"name": "edaformer-t-ade20k", "num_classes": 4, "encoder_weights": None},
           "data": {"type": "folder", "root": "/d", "classes": ["a", "b"], "batch_size": 2},
           "optim": dict(OPTIM), "schedule": dict(SCHEDULE), "train": {"seed": 0}}
    for key, value in changes.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def test_check_resume_config(tmp_path):
    ckpt = {"iteration": 6, "model": "edaformer-t-ade20k", "config": _cfg()}
    path = tmp_path / "iter_6.pth"
    assert check_resume_config(ckpt, _cfg(), path) == []
    assert check_resume_config(ckpt, _cfg(**{"optim.lr": 5e-4, "data.root": "/e", "model.encoder_weights": "x.pth"}),
                               path) == ["data.root: '/d' -> '/e'", "optim.lr: 0.001 -> 0.0005"]
    before_the_rename = _cfg()
    before_the_rename["model"]["pretrained"] = before_the_rename["model"].pop("encoder_weights")
    assert check_resume_config({**ckpt, "config": before_the_rename}, _cfg(), path) == []
    with pytest.raises(ResumeConfigError, match=r"model.name is 'edaformer-b-ade20k' but 'edaformer-t-ade20k' in "
                                                r"the checkpoint"):
        check_resume_config(ckpt, _cfg(**{"model.name": "edaformer-b-ade20k"}), path)
    with pytest.raises(ResumeConfigError, match=r"data.classes is \['a', 'b', 'c'\] but \['a', 'b'\]"):
        check_resume_config(ckpt, _cfg(**{"data.classes": ["a", "b", "c"]}), path)
    with pytest.raises(ResumeConfigError, match=r"schedule.iters=4 is below the iteration of .*iter_6.pth \(6\)"):
        check_resume_config(ckpt, _cfg(**{"schedule.iters": 4}), path)
    # a key the library gained after the checkpoint was written is no change at its default, one otherwise
    assert check_resume_config(ckpt, _cfg(**{"optim.impl": "auto"}), path) == []
    assert check_resume_config(ckpt, _cfg(**{"optim.impl": "fused"}), path) == ["optim.impl: None -> 'fused'"]
    with pytest.raises(ResumeConfigError, match="holds 'edaformer-t-ade20k'"):   # an older checkpoint: no config
        check_resume_config({"iteration": 6, "model": "edaformer-t-ade20k"}, _cfg(**{"model.name": "x"}), path)
