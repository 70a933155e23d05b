"""`edaformer pretrain`: the PVTv2 recipe's configs, the RandAugment posterize fix, and short runs on
a classification set cut from real CamVid frames (learning, exact resume after SIGTERM, the
encoder file in timm and in segmentation training, named bad images, one run per work dir)."""
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.classification_data import CAMVID, CLASSES, SHIPPED_CONFIGS, camvid_patches, write_pretrain_config
from edaformer.cli import main as cli_main
from edaformer.config import PRETRAINING, ConfigError, load_config
from edaformer.data import DatasetError
from edaformer.engine import pretrain as pretrain_module
from edaformer.engine.pretrain import pretrain
from tests.helpers.training_data import make_dataset, write_config

needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason="the CamVid dataset is not in ../shared/datasets/camvid")
# a short run learns more without the regularisation meant for 300 epochs
LIGHT = ["mixup.mixup_alpha=0", "mixup.cutmix_alpha=0", "data.auto_augment=null", "data.re_prob=0", "optim.lr=3e-4",
         "model.drop_path_rate=0", "loss.label_smoothing=0"]


def _records(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]


# -- configs -------------------------------------------------------------------------------------
def test_shipped_configs_are_the_pvtv2_recipe_and_resolve_by_name(tmp_path, capsys):
    t = load_config("eft-t-imagenet", ["data.root=/data/in1k", "optim.lr=5e-4"], PRETRAINING)
    b = load_config("eft-b-imagenet.yaml", [], PRETRAINING)
    assert (t["model"]["name"], b["model"]["name"]) == ("eft_t", "eft_b")
    assert t["data"]["root"] == "/data/in1k" and t["optim"]["lr"] == 5e-4 and b["optim"]["lr"] == 1e-3
    assert b["optim"]["lr"] == pytest.approx(5e-4 * b["optim"]["lr_batch"] / 512)
    for cfg in (t, b):
        assert cfg["optim"]["name"] == "adamw" and cfg["optim"]["weight_decay"] == 0.05
        assert cfg["schedule"] == dict(cfg["schedule"], name="cosine", epochs=300, warmup_epochs=5, min_lr=1e-5)
        assert cfg["data"]["img_size"] == 224 and cfg["data"]["interpolation"] == "bicubic"
        assert cfg["data"]["auto_augment"] == "rand-m9-mstd0.5-inc1" and cfg["data"]["re_prob"] == 0.25
        assert (cfg["mixup"]["mixup_alpha"], cfg["mixup"]["cutmix_alpha"], cfg["loss"]["label_smoothing"]) == \
            (0.8, 1.0, 0.1)
        assert cfg["model"]["drop_path_rate"] == 0.1 and cfg["ema"]["enabled"] is False
    with pytest.raises(ConfigError, match=r"unknown key.*'iters'"):       # the segmentation keys are not these
        load_config("eft-t-imagenet", ["schedule.iters=10"], PRETRAINING)
    with pytest.raises(FileNotFoundError, match=r"config file not found: \S*eft-s-imagenet .*edaformer configs"):
        load_config("eft-s-imagenet", [], PRETRAINING)
    assert {p.name for p in SHIPPED_CONFIGS.glob("eft-*-imagenet.yaml")} == {"eft-t-imagenet.yaml",
                                                                               "eft-b-imagenet.yaml"}


# -- RandAugment posterize -------------------------------------------------------------------------
def test_randaugment_posterize_at_magnitude_10_is_a_black_image():
    """``rand-m9-mstd0.5-inc1`` draws magnitudes around 9 clipped at 10; PosterizeIncreasing maps 10
    to 0 bits, which Pillow 13 refuses. The fixed op gives the 0-bit image (black), as older Pillow
    did, and leaves every other magnitude as timm computes it."""
    from timm.data.auto_augment import rand_augment_transform

    from edaformer.data.classification import fix_posterize, train_transform

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    op = next(o for o in rand_augment_transform("rand-m9-mstd0.5-inc1", {}).ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude_std = 1.0, 0.0
    reference = {}
    for m in range(10):
        op.magnitude = m
        reference[m] = np.asarray(op(img))
    op.magnitude = 10
    try:
        op(img)
    except ValueError as e:           # Pillow >= 13: the error the recipe ran into
        assert "bits must be between" in str(e)
    fix_posterize(op)
    assert not np.asarray(op(img)).any()
    for m, expected in reference.items():
        op.magnitude = m
        assert np.array_equal(np.asarray(op(img)), expected)
    # the whole training transform, magnitudes drawn up to the clip at 10 over and over
    cfg = load_config(SHIPPED_CONFIGS / "eft-t-imagenet.yaml", ["data.img_size=16"], PRETRAINING)["data"]
    transform = train_transform(dict(cfg, auto_augment="rand-m9-mstd100-inc1-n4"), (0.5,) * 3, (0.5,) * 3)
    posterize_ops = [o for o in transform.transforms[2].ops if o.name.startswith("Posterize")]
    assert posterize_ops and all(o.aug_fn.__module__ == "edaformer.data.classification" for o in posterize_ops)
    for o in posterize_ops:
        o.prob = 1.0
    for _ in range(40):
        assert transform(img).shape == (3, 16, 16)


# -- short runs on CamVid patches ------------------------------------------------------------------
@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    if not CAMVID.is_dir():
        pytest.skip("the CamVid dataset is not in ../shared/datasets/camvid")
    root = tmp_path_factory.mktemp("camvid-patches")
    counts = camvid_patches(root)
    assert all(n >= 30 for split in counts.values() for n in split.values()), counts
    return root


@pytest.mark.slow
@needs_camvid
def test_learns_camvid_patches_and_the_encoder_feeds_timm_and_segmentation(patches, tmp_path, capsys, caplog):
    """3 epochs on 127 patches of 40 training frames (4 classes): the loss falls and the top-1 on
    160 patches of 50 held-out validation frames (other drives) is far above chance (25 %). ``--json`` ends the
    output; its ``checkpoint`` loads in timm and starts a 2-iteration segmentation run."""
    cfg_path = write_pretrain_config(tmp_path / "p.yaml", patches, schedule={"epochs": 3})
    work = tmp_path / "work"
    code = cli_main(["pretrain", str(cfg_path), "--work-dir", str(work), "--device", "cpu", "--json", "--set", *LIGHT])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = _records(work)
    steps = [r for r in records if "mode" not in r]
    vals = [r for r in records if r.get("mode") == "val"]
    print("loss / top-1 per epoch:", [(v["epoch"], round(v["train_loss"], 3), round(v["top1"], 1), round(v["loss"], 3))
                                      for v in vals])
    assert [v["epoch"] for v in vals] == [1, 2, 3] and all("top5" in v for v in vals)
    assert all(r["images_per_s"] > 0 for r in steps)
    assert vals[-1]["train_loss"] < steps[0]["loss"] and vals[-1]["train_loss"] < math.log(4)
    assert vals[-1]["loss"] < math.log(4) - 0.25                        # held-out cross-entropy
    assert result["top1"] == vals[-1]["top1"] >= 40.0                   # chance: 25 % (+- 3.4 % for 160 images)
    encoder = Path(result["checkpoint"])
    assert encoder == (work / "encoder.pth").resolve() and result["top5"] == vals[-1]["top5"]

    # timm: the classifier, and the encoder alone
    import timm

    trained = torch.load(encoder, weights_only=True)["state_dict"]
    clf = timm.create_model("eft_t", pretrained=True, num_classes=4,
                            pretrained_cfg_overlay=dict(file=str(encoder), num_classes=4))
    assert all(torch.equal(v, trained[k]) for k, v in clf.state_dict().items())
    backbone = timm.create_model("eft_t", pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay=dict(file=str(encoder)))
    assert backbone.state_dict().keys() == {k for k in trained if not k.startswith("head.")}
    assert all(torch.equal(v, trained[k]) for k, v in backbone.state_dict().items())

    # segmentation: every encoder tensor, said so, and a 2-iteration run
    from edaformer.engine import build_model, train

    data = make_dataset(tmp_path / "seg", n=2)
    seg_cfg = load_config(write_config(tmp_path / "s.yaml", data, model={"encoder_weights": str(encoder)},
                                       schedule={"iters": 2, "warmup_iters": 1}))
    caplog.set_level("INFO", logger="edaformer")
    model = build_model(seg_cfg["model"], 4)
    n = len(model.encoder.state_dict())
    assert f"all {n} encoder tensors loaded" in caplog.text and "top1" in caplog.text
    assert all(torch.equal(v, trained[k]) for k, v in model.encoder.state_dict().items())
    out = train(seg_cfg, tmp_path / "seg-work", device="cpu")
    assert out["iteration"] == 2


@pytest.mark.slow
@needs_camvid
def test_resume_after_sigterm_is_exact(patches, tmp_path, monkeypatch, capsys):
    """The full recipe (RandAugment, random erasing, Mixup / CutMix, label smoothing, repeated
    augmentation, stochastic depth, EMA), 2 epochs of 4 updates. SIGTERM during update 4 stops at
    epoch 1's end before its validation; the resumed run validates first, is stopped again during
    update 6 (inside epoch 2) and resumed to the end. Each stop writes a checkpoint and prints the
    resume command; the end is bit for bit the uninterrupted run's (weights, EMA, optimizer, log)."""
    small = tmp_path / "small"
    for split, n in (("train", 8), ("validation", 2)):
        for name in CLASSES:
            (small / split / name).mkdir(parents=True)
            for f in sorted((patches / split / name).glob("*.png"))[:n]:
                (small / split / name / f.name).symlink_to(f)
    cfg_path = write_pretrain_config(tmp_path / "r.yaml", small, data={"batch_size": 8, "repeated_aug": 3},
                                     ema={"enabled": True, "decay": 0.9}, schedule={"epochs": 2, "warmup_epochs": 1})
    cfg = load_config(cfg_path, [], PRETRAINING)
    assert cfg["mixup"]["mixup_alpha"] == 0.8 and cfg["data"]["auto_augment"] == "rand-m9-mstd0.5-inc1"
    full = pretrain(cfg, tmp_path / "full", device="cpu")
    assert full["iteration"] == 8

    work = tmp_path / "stopped"
    argv = ["pretrain", str(cfg_path), "--work-dir", str(work), "--device", "cpu"]
    resume = f"continue with: edaformer pretrain {cfg_path} --work-dir {work} --resume auto --device cpu"
    for signal_after, resume_flag, stopped_at, files in ((3, [], 4, ["iter_4.pth"]),
                                                         (5, ["--resume"], 6, ["iter_4.pth", "iter_6.pth"])):
        monkeypatch.setattr(pretrain_module, "_after_update",   # the signal lands during the next update
                            lambda it, n=signal_after: os.kill(os.getpid(), signal.SIGTERM) if it == n else None)
        assert cli_main(argv + resume_flag) == 143
        err = capsys.readouterr().err
        assert f"stopped by SIGTERM after iteration {stopped_at}" in err and resume in err
        assert sorted(p.name for p in work.glob("iter_*.pth")) == files
    monkeypatch.setattr(pretrain_module, "_after_update", lambda it: None)
    assert cli_main(argv + ["--resume", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["iteration"] == 8 and result["ema"] is True and result["top1"] == full["top1"]
    a = torch.load(tmp_path / "full" / "latest.pth", weights_only=True)
    b = torch.load(work / "latest.pth", weights_only=True)
    for part in ("state_dict", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    moments = [(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in a["optimizer"]["state"]]
    assert all(torch.equal(x, y) for x, y in moments)
    assert torch.equal(torch.load(tmp_path / "full" / "encoder.pth", weights_only=True)["state_dict"]["head.weight"],
                       a["ema"]["head.weight"])                           # encoder.pth: the validated EMA weights
    timing = ("time", "data_time", "images_per_s", "memory_mb")
    assert [{k: v for k, v in r.items() if k not in timing} for r in _records(work)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in _records(tmp_path / "full")]
    assert sorted(p.name for p in work.glob("iter_*.pth")) == ["iter_6.pth", "iter_8.pth"]


# -- faults ------------------------------------------------------------------------------------
def _tiny_classes(root: Path, n: int = 4, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(rng.normal(60 * c + 30, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_a_bad_image_is_named_or_skipped_and_a_work_dir_holds_one_run(tmp_path, caplog):
    data = _tiny_classes(tmp_path / "d")
    bad = data / "train" / "road" / "broken.jpg"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:200])
    cfg_path = write_pretrain_config(tmp_path / "c.yaml", data, data={"batch_size": 17, "repeated_aug": 0},
                                     mixup={"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, schedule={"epochs": 1})
    with pytest.raises(DatasetError, match=r"cannot read train image .*road/broken\.jpg.*skip_bad_images"):
        pretrain(load_config(cfg_path, [], PRETRAINING), tmp_path / "w1", device="cpu")
    caplog.set_level("WARNING", logger="edaformer")
    cfg = load_config(cfg_path, ["data.skip_bad_images=true"], PRETRAINING)
    result = pretrain(cfg, tmp_path / "w2", device="cpu", force=True)
    assert result["iteration"] == 1 and "broken.jpg" in caplog.text and "skipped" in caplog.text
    from edaformer.engine import WorkDirError

    with pytest.raises(WorkDirError, match="holds an earlier run.*--resume auto"):
        pretrain(cfg, tmp_path / "w2", device="cpu")


def test_a_tar_file_is_a_training_set(tmp_path):
    import tarfile

    from edaformer.engine.pretrain import build_pretrain_data

    data = _tiny_classes(tmp_path / "d", n=2)
    with tarfile.open(tmp_path / "train.tar", "w") as tar:
        tar.add(data / "train", arcname=".")
    cfg = load_config(write_pretrain_config(tmp_path / "c.yaml", tmp_path / "train.tar", data={"val_root": str(data)}),
                      [], PRETRAINING)
    train_set, val_set, classes = build_pretrain_data(cfg["data"], (0.5,) * 3, (0.5,) * 3)
    assert (len(train_set), len(val_set), classes) == (8, 8, 4)
    image, label = train_set[3]
    assert image.shape == (3, 32, 32) and train_set.filename(3).startswith(f"{tmp_path / 'train.tar'}:")
    assert train_set.class_to_idx == val_set.class_to_idx


def test_an_imagenet_encoder_file_loads_in_timm_as_is_and_not_into_another_size(tmp_path):
    import timm

    from edaformer.checkpoint import CheckpointMismatchError
    from edaformer.engine import build_model
    from edaformer.engine.pretrain import export_encoder

    torch.manual_seed(0)
    source = timm.create_model("eft_t")                                     # 1000 classes, as on ImageNet
    export_encoder(source, tmp_path / "t.pth", "eft_t", {"top1": 1.0})
    loaded = timm.create_model("eft_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "t.pth")))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
    export_encoder(timm.create_model("eft_b", num_classes=3), tmp_path / "b.pth", "eft_b", {})
    with pytest.raises(CheckpointMismatchError, match=r"b\.pth: only 0 of the model's \d+ encoder tensors"):
        build_model({"name": "edaformer-t-ade20k", "encoder_weights": str(tmp_path / "b.pth")}, 4)
