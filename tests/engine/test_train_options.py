"""Training options: the EMA of the weights (timm's ModelEmaV3: its update, its checkpoint, its exact
resume, validation and best_mIoU.pth on its weights) and channels-last memory format."""
import json

import pytest
import torch

import edaformer
from edaformer.config import ConfigError, load_config
from edaformer.engine import train
from tests.helpers.training_data import make_dataset, max_diff, state, write_config

DECAY, POWER = 0.5, 0.75


def _ema_decay(step: int) -> float:
    """``train.ema_warmup`` with ``ema_decay`` 0.5: timm's decay after optimizer step ``step``
    (1-based): 0 at the first (the EMA is a copy), then ``1 - step' ** -power`` (``step' = step``)
    up to ``ema_decay``."""
    return 0.0 if step == 1 else min(1 - step ** -POWER, DECAY)


def _expected_ema(weights: list[dict]) -> dict:
    """The moving average of ``weights`` (one state dict per step), by hand: floating tensors
    ``d * ema + (1 - d) * w``; integer buffers are copied."""
    ema = {}
    for step, w in enumerate(weights, 1):
        d = _ema_decay(step)
        ema = {k: (d * ema[k] + (1 - d) * v if step > 1 and v.is_floating_point() else v.clone()) for k, v in w.items()}
    return ema


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """3 iterations with the EMA (decay 0.5 with warm-up), a checkpoint after every one, validation at the end."""
    tmp = tmp_path_factory.mktemp("ema")
    data = make_dataset(tmp / "data", n=4)
    cfg_path = write_config(tmp / "ema.yaml", data, optim={"lr": 1e-3, "eps": 1e-4},
                            schedule={"iters": 3, "warmup_iters": 0},
                            train={"checkpoint_interval": 1, "keep_checkpoints": 0, "ema": True, "ema_decay": DECAY,
                                   "ema_warmup": True, "ema_warmup_power": POWER})
    result = train(load_config(cfg_path), tmp / "work", device="cpu")
    return tmp, cfg_path, result


def test_ema_is_the_moving_average_of_the_weights_and_is_validated_and_kept(ema_run):
    tmp, _, result = ema_run
    work = tmp / "work"
    ckpts = [state(work / f"iter_{i}.pth") for i in (1, 2, 3)]
    for i, ckpt in enumerate(ckpts, 1):
        expected = _expected_ema([c["state_dict"] for c in ckpts[:i]])
        assert ckpt["state_dict_ema"].keys() == expected.keys()
        for k, v in expected.items():  # float32 rounding of the lerp; integer buffers exact
            torch.testing.assert_close(ckpt["state_dict_ema"][k], v, rtol=1e-5, atol=1e-7, msg=f"{k} at step {i}")
    final = ckpts[-1]
    assert max_diff(final["state_dict_ema"], final["state_dict"]) > 1e-4  # the EMA is not the weights
    # validation measured the EMA weights, and best_mIoU.pth holds them
    best = state(work / "best_mIoU.pth")
    assert all(torch.equal(best["state_dict"][k], final["state_dict_ema"][k]) for k in final["state_dict_ema"])
    assert best["meta"]["weights"] == "ema" and best["meta"]["mIoU"] == pytest.approx(result["best_mIoU"])
    assert "state_dict_ema" not in best
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=4)
    edaformer.load_checkpoint(model, work / "best_mIoU.pth")  # packaging / predict read it as any model file
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    (val,) = [r for r in records if r.get("mode") == "val"]
    assert val["weights"] == "ema" and val["mIoU"] == pytest.approx(result["best_mIoU"])


def test_resume_with_ema_is_exact(ema_run, caplog):
    tmp, cfg_path, _ = ema_run
    cfg = load_config(cfg_path)
    uninterrupted = state(tmp / "work" / "iter_3.pth")
    train(cfg, tmp / "resumed", resume=str(tmp / "work" / "iter_1.pth"), device="cpu")
    resumed = state(tmp / "resumed" / "latest.pth")
    for key in ("state_dict", "state_dict_ema"):
        assert all(torch.equal(uninterrupted[key][k], resumed[key][k]) for k in uninterrupted[key]), key
    # a checkpoint written without an EMA: the EMA starts from its weights (here what the EMA was anyway)
    plain = state(tmp / "work" / "iter_1.pth")
    del plain["state_dict_ema"], plain["checksum"]
    edaformer.save_checkpoint(plain, tmp / "no_ema.pth")
    with caplog.at_level("INFO", logger="edaformer"):
        train(cfg, tmp / "from_plain", resume=str(tmp / "no_ema.pth"), device="cpu")
    assert "holds no EMA weights: the EMA starts from its weights at iteration 1" in caplog.text
    from_plain = state(tmp / "from_plain" / "latest.pth")["state_dict_ema"]
    assert all(torch.equal(uninterrupted["state_dict_ema"][k], from_plain[k]) for k in from_plain)
    # and with the EMA switched off, its weights in the checkpoint are left alone
    caplog.clear()
    with caplog.at_level("INFO", logger="edaformer"):
        train(load_config(cfg_path, ["train.ema=false", "schedule.iters=2"]), tmp / "off",
              resume=str(tmp / "work" / "iter_1.pth"), device="cpu")
    assert "EMA weights are not used (train.ema is off)" in caplog.text and "train.ema: True -> False" in caplog.text
    assert "state_dict_ema" not in state(tmp / "off" / "latest.pth")
    assert all(r.get("weights", "model") == "model" for r in map(json.loads, (tmp / "off" / "log.jsonl").open())
               if r.get("mode") == "val")


def test_channels_last_trains_the_same_model(ema_run):
    """``train.channels_last`` changes the memory format, not the numbers (beyond rounding); its
    checkpoints load into a plain model."""
    tmp, cfg_path, _ = ema_run
    train(load_config(cfg_path, ["train.channels_last=true", "train.checkpoint_interval=0"]), tmp / "cl",
          device="cpu")
    plain, cl = state(tmp / "work" / "latest.pth"), state(tmp / "cl" / "latest.pth")
    conv = "encoder.stages.0.downsample.proj.weight"
    assert cl["state_dict"][conv].is_contiguous(memory_format=torch.channels_last)
    assert not plain["state_dict"][conv].is_contiguous(memory_format=torch.channels_last)
    moved = max_diff(plain["state_dict"], state(tmp / "work" / "iter_1.pth")["state_dict"])
    assert max_diff(plain["state_dict"], cl["state_dict"]) < 1e-4 < moved
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=4)
    edaformer.load_checkpoint(model, tmp / "cl" / "best_mIoU.pth")


@pytest.mark.parametrize("override, message", [
    ("train.ema=1", "train.ema must be true or false"),
    ("train.ema_decay=1.0", r"train.ema_decay must be a number in \[0, 1\)"),
    ("train.ema_decay=-0.1", r"train.ema_decay must be a number in \[0, 1\)"),
    ("train.ema_warmup_power=0", r"train.ema_warmup_power must be a number in \(0, 1\]"),
    ("train.channels_last=maybe", "train.channels_last must be true or false"),
])
def test_option_keys_are_checked(tmp_path, override, message):
    cfg_path = write_config(tmp_path / "c.yaml", tmp_path)
    defaults = load_config(cfg_path)["train"]
    assert (defaults["ema"], defaults["ema_decay"], defaults["ema_warmup"], defaults["channels_last"]) == \
        (False, 0.9998, False, False)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg_path, [override])
