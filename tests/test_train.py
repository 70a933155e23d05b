"""Configs, optimizer / schedule and the training loop (single process, DDP, resume, NaN stop),
on tiny folder datasets built in tmp_path."""
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import edaformer
from edaformer.cli import main as cli_main
from edaformer.config import DEFAULTS, ConfigError, load_config, load_yaml, save_config
from edaformer.engine import (NonFiniteLossError, WarmupPolyLR, build_optimizer, build_param_groups,
                              build_scheduler, find_resume_checkpoint, segmentation_loss, train)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_YAML = REPO / "configs" / "_base_" / "default.yaml"
CLASSES = ["red", "green", "blue", "yellow"]
COLORS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 230, 40]], np.uint8)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast on a shared 2-core machine and the same math in every process."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_dataset(root: Path, n: int = 4, size: int = 32, seed: int = 0) -> Path:
    """``n`` images per split: a 4x4 grid of coloured blocks, label = colour index; a few
    ignored (255) pixels. The val split holds the same images."""
    rng = np.random.default_rng(seed)
    block = size // 4
    for i in range(n):
        grid = rng.integers(0, len(CLASSES), (4, 4))
        label = np.kron(grid, np.ones((block, block), np.int64)).astype(np.uint8)
        image = COLORS[label].astype(np.int16) + rng.integers(-12, 12, (size, size, 3))
        label[0, :3] = 255
        for split in ("train", "val"):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / split / f"{i}.png")
            Image.fromarray(label).save(root / "annotations" / split / f"{i}.png")
    return root


def write_config(path: Path, data_root: Path, size: int = 32, **sections) -> Path:
    """A config inheriting the repository's default.yaml: edaformer-t, 4 classes, no augmentation."""
    cfg = {
        "_base_": str(DEFAULT_YAML),
        "model": {"name": "edaformer-t-ade20k", "num_classes": 4, "drop_path_rate": 0.0,
                  "decoder_drop_path": 0.0, "dropout": 0.0},
        "data": {"type": "folder", "root": str(data_root), "classes": CLASSES, "img_suffix": ".png",
                 "scale": [size, size], "ratio_range": [1.0, 1.0], "crop_size": [size, size],
                 "cat_max_ratio": 1.0, "flip_prob": 0.0, "photometric": False, "batch_size": 2, "workers": 0},
        "optim": {"lr": 1e-4},
        "schedule": {"iters": 6, "warmup_iters": 2},
        "train": {"checkpoint_interval": 2, "eval_interval": 0, "log_interval": 1, "keep_checkpoints": 2,
                  "deterministic": True},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


# -- config -------------------------------------------------------------------------------------
def test_config_inheritance_overrides_and_save(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text(
        "optim: {lr: 1e-3, betas: [0.8, 0.9]}\nschedule: {iters: 100}\ndata: {type: folder, root: /r, crop_size: [8, 8]}\n")
    (tmp_path / "base" / "b.yaml").write_text("_base_: a.yaml\noptim: {weight_decay: 0.5}\nmodel: {name: edaformer-t-ade20k}\n")
    (tmp_path / "run.yaml").write_text("_base_: [base/b.yaml]\noptim: {betas: [0.7, 0.8]}\ndata: {batch_size: 3}\n")
    cfg = load_config(tmp_path / "run.yaml", ["optim.lr=2e-4", "data.root=/x", "eval.isr=2211-222",
                                              "train.amp=bf16", "data.crop_size=[16, 24]", "model.pretrained=null"])
    assert cfg["optim"] == {"lr": 2e-4, "betas": [0.7, 0.8], "eps": 1e-8, "weight_decay": 0.5, "decoder_lr_mult": 10.0}
    assert cfg["data"]["root"] == "/x" and cfg["data"]["batch_size"] == 3 and cfg["data"]["crop_size"] == [16, 24]
    assert cfg["data"]["workers"] == DEFAULTS["data"]["workers"]          # defaults filled in
    assert cfg["schedule"]["iters"] == 100 and cfg["schedule"]["warmup_iters"] == 1500
    assert cfg["eval"]["isr"] == "2211-222" and cfg["train"]["amp"] == "bf16"
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml") == cfg          # the resolved config round-trips


@pytest.mark.parametrize("text, overrides, match", [
    ("model: {name: m}\ndata: {type: folder, root: r}\nschedule: {iters: 1}\noptimizer: {lr: 1}\n", [],
     r"unknown config section.*'optimizer'.*did you mean 'optim'"),
    ("model: {name: m}\ndata: {type: folder}\n", [], r"missing required config key\(s\): data.root, schedule.iters"),
    ("model: {name: m}\ndata: {type: folder, root: r}\nschedule: {iters: 1, warmup: 3}\n", [],
     r"unknown key\(s\) in section 'schedule'.*'warmup'.*warmup_iters"),
    ("model: {name: m}\ndata: {type: folder, root: r}\nschedule: {iters: 1}\n", ["optim.lr"], "section.key=value"),
    ("model: {name: m}\ndata: {type: folder, root: r}\nschedule: {iters: 1}\n", ["train.amp=fp8"], "train.amp"),
    ("model: {name: m}\ndata: {type: folder, root: r}\nschedule: {iters: 0}\n", [], "schedule.iters"),
    ("model: {name: m}\ndata: {type: folder, root: r}\nschedule: {iters: 1}\n", ["eval.isr=22-1"], "eval.isr"),
])
def test_config_errors(tmp_path, text, overrides, match):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "c.yaml", overrides)


def test_config_base_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")


def test_repository_configs():
    assert load_yaml(DEFAULT_YAML) == DEFAULTS | {"schedule": DEFAULTS["schedule"] | {"iters": 160000}}
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert {f.stem for f in files} >= {f"edaformer-{s}-{d}" for s in "tb"
                                       for d in ("ade20k", "cityscapes", "cocostuff", "camvid")}
    for f in files:
        cfg = load_config(f)
        assert cfg["optim"]["lr"] == 6e-5 and cfg["optim"]["decoder_lr_mult"] == 10
        assert cfg["model"]["name"] in edaformer.list_models()
    city_b = load_config(REPO / "configs" / "edaformer-b-cityscapes.yaml")
    assert city_b["data"]["batch_size"] == 1 and city_b["eval"]["mode"] == "slide"
    assert city_b["eval"]["stride"] == [768, 768] and city_b["data"]["crop_size"] == [1024, 1024]
    assert load_config(REPO / "configs" / "edaformer-t-cocostuff.yaml")["schedule"]["iters"] == 80000
    camvid = load_config(REPO / "configs" / "edaformer-t-camvid.yaml")
    assert camvid["model"]["num_classes"] == 11 and camvid["data"]["ignore_index"] == 11
    from edaformer.data.palettes import get_dataset_info

    info = get_dataset_info("camvid")
    assert tuple(camvid["data"]["classes"]) == info.classes
    assert tuple(map(tuple, camvid["data"]["palette"])) == info.palette


# -- optimizer, schedule, loss --------------------------------------------------------------------
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


def test_find_resume_checkpoint(tmp_path, caplog):
    for n in (2, 4):
        edaformer.save_checkpoint({"iteration": n, "state_dict": {"w": torch.zeros(1)}}, tmp_path / f"iter_{n}.pth")
    os.link(tmp_path / "iter_2.pth", tmp_path / "latest.pth")      # stale: stopped before relinking
    (tmp_path / "iter_6.pth").write_bytes(b"truncated")
    path, ckpt = find_resume_checkpoint(tmp_path)
    assert path.name == "iter_4.pth" and ckpt["iteration"] == 4
    assert "skipping checkpoint" in caplog.text and "iter_6.pth" in caplog.text
    assert find_resume_checkpoint(tmp_path / "empty") is None


# -- training runs -------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """2 processes x 2 images (gloo, SyncBN) == 1 process x 4 images after 3 iterations.

    AdamW's eps is raised to 1e-4 here: with eps 1e-8 Adam turns rounding-level gradient
    differences of entries whose gradient is ~0 (e.g. the last decoder blocks' fc2 biases,
    whose true gradient is exactly 0 because the fuse BatchNorm removes any constant shift)
    into full +-lr steps, which would hide what this test checks."""
    data = make_dataset(tmp_path / "data", n=4)
    cfg_path = write_config(tmp_path / "ddp.yaml", data, optim={"lr": 1e-4, "eps": 1e-4},
                            schedule={"iters": 3, "warmup_iters": 0}, train={"checkpoint_interval": 0})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "edaformer", "train", str(cfg_path), "--work-dir", str(tmp_path / "ddp"), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the single-process run with the same global batch, meanwhile
    cfg = load_config(cfg_path, ["data.batch_size=4"])
    train(cfg, tmp_path / "single", device="cpu")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "batch 2 x 2 processes = 4" in out
    ddp, single = state(tmp_path / "ddp" / "latest.pth"), state(tmp_path / "single" / "latest.pth")
    assert ddp["iteration"] == single["iteration"] == 3 and len(ddp["rng"]) == 2
    diff = max_diff(ddp["state_dict"], single["state_dict"])
    torch.manual_seed(0)  # the run's seed: the same initial weights
    init = dict(edaformer.create_model("edaformer-t-ade20k", num_classes=4).named_parameters())
    moved = max((single["state_dict"][k] - p.detach()).abs().max().item() for k, p in init.items())
    print(f"DDP (2x2) vs single (1x4): max weight difference {diff:.2e} (weights moved up to {moved:.2e})")
    assert diff < 1e-5 and moved > 1e-4
    # validation is split over the ranks and the counts all-reduced: same metrics
    val = lambda p: [json.loads(line) for line in p.read_text().splitlines() if '"val"' in line][-1]
    assert val(tmp_path / "ddp" / "log.jsonl")["mIoU"] == pytest.approx(val(tmp_path / "single" / "log.jsonl")["mIoU"],
                                                                         abs=1e-3)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path, caplog):
    """SIGKILL a run after its first checkpoint; --resume auto (skipping a corrupt latest.pth)
    must end with exactly the weights of an uninterrupted run. 6 images / batch 2 = 3 iterations
    per epoch, so the resume starts inside an epoch and crosses epoch boundaries."""
    data = make_dataset(tmp_path / "data", n=6)
    cfg_path = write_config(tmp_path / "r.yaml", data, schedule={"iters": 8, "warmup_iters": 2},
                            model={"drop_path_rate": 0.2, "decoder_drop_path": 0.1, "dropout": 0.1},
                            data={"flip_prob": 0.5, "photometric": True, "ratio_range": [0.75, 1.5]})
    work = tmp_path / "killed"
    cmd = [sys.executable, "-m", "edaformer", "train", str(cfg_path), "--work-dir", str(work), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cfg = load_config(cfg_path)
    train(cfg, tmp_path / "full", device="cpu")                 # uninterrupted, meanwhile
    deadline = time.monotonic() + 300
    while not (work / "iter_2.pth").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (work / "iter_8.pth").exists()
    written = max(int(p.stem.split("_")[1]) for p in work.glob("iter_*.pth"))
    (work / "latest.pth").unlink()                              # a corrupt newest checkpoint is skipped
    (work / "latest.pth").write_bytes(b"not a checkpoint")
    with caplog.at_level("INFO", logger="edaformer"):
        result = train(cfg, work, resume="auto", device="cpu")
    assert result["iteration"] == 8
    assert "skipping checkpoint" in caplog.text and "latest.pth" in caplog.text
    assert f"iter_{written}.pth at iteration {written}" in caplog.text
    full, resumed = state(tmp_path / "full" / "latest.pth"), state(work / "latest.pth")
    diff = max_diff(full["state_dict"], resumed["state_dict"])
    print(f"resume from iteration {written} of 8: max weight difference to the uninterrupted run {diff:.1e}")
    assert all(torch.equal(full["state_dict"][k], resumed["state_dict"][k]) for k in full["state_dict"])
    assert full["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()
    assert sorted(p.name for p in work.glob("iter_*.pth")) == ["iter_6.pth", "iter_8.pth"]  # keep_checkpoints 2


def test_grad_checkpointing_amp_on_cpu_and_resume_from_path(tmp_path):
    """Gradient checkpointing changes no numbers; AMP is ignored (with a warning) on the CPU;
    ``resume=PATH`` continues another run's checkpoint; the work dir holds config and log."""
    data = make_dataset(tmp_path / "data", n=4)
    cfg_path = write_config(tmp_path / "g.yaml", data, schedule={"iters": 3, "warmup_iters": 1})
    plain = train(load_config(cfg_path), tmp_path / "plain", device="cpu")
    with pytest.warns(UserWarning, match="needs CUDA"):
        train(load_config(cfg_path, ["train.grad_checkpointing=true", "train.amp=bf16"]), tmp_path / "ckpt",
              device="cpu")
    resumed = train(load_config(cfg_path), tmp_path / "other", resume=str(tmp_path / "plain" / "iter_2.pth"),
                    device="cpu")
    final = state(tmp_path / "plain" / "latest.pth")["state_dict"]
    assert max_diff(final, state(tmp_path / "ckpt" / "latest.pth")["state_dict"]) == 0.0
    assert max_diff(final, state(tmp_path / "other" / "latest.pth")["state_dict"]) == 0.0
    assert plain["iteration"] == resumed["iteration"] == 3
    assert load_config(tmp_path / "plain" / "config.yaml") == load_config(cfg_path)
    records = [json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train_rec] == [1, 2, 3]
    assert set(train_rec[0]) == {"iter", "loss", "lr", "time", "data_time", "memory_mb"}
    assert train_rec[0]["lr"] == pytest.approx(1e-4 * 1e-6) and train_rec[0]["memory_mb"] > 0
    assert records[-1]["mode"] == "val" and 0 <= records[-1]["mIoU"] <= 1
    # resuming with a longer schedule: the position comes from the checkpoint, the shape from the config
    longer = train(load_config(cfg_path, ["schedule.iters=5"]), tmp_path / "plain", resume="auto", device="cpu")
    records = [json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").read_text().splitlines()]
    assert longer["iteration"] == 5
    assert [r["lr"] for r in records if r.get("iter") == 4 and "lr" in r] == [pytest.approx(1e-4 * (1 - 3 / 5))]


@pytest.mark.slow
def test_overfit_four_images(tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    cfg_path = write_config(tmp_path / "o.yaml", data, data={"batch_size": 4}, optim={"lr": 1e-3},
                            schedule={"iters": 80, "warmup_iters": 5}, train={"checkpoint_interval": 0,
                                                                              "log_interval": 20})
    result = train(load_config(cfg_path), tmp_path / "work", device="cpu")
    print(f"overfit 4 images, 80 iterations: mIoU {result['metrics']['mIoU']:.3f}")
    assert result["metrics"]["mIoU"] > 0.9
    best = state(tmp_path / "work" / "best_mIoU.pth")
    assert best["meta"]["mIoU"] == pytest.approx(result["best_mIoU"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "data", n=4)
    cfg_path = write_config(tmp_path / "n.yaml", data)
    calls = {"n": 0}
    real_loss = segmentation_loss

    def loss_going_nan(logits, labels, ignore_index=255):
        calls["n"] += 1
        loss = real_loss(logits, labels, ignore_index)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(importlib.import_module("edaformer.engine.train"), "segmentation_loss", loss_going_nan)
    work = tmp_path / "work"
    rc = cli_main(["train", str(cfg_path), "--work-dir", str(work), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "loss is nan at iteration 3" in err and "iter_2.pth" in err
    latest = state(work / "latest.pth")
    assert latest["iteration"] == 2 and not (work / "iter_4.pth").exists()
    assert all(torch.isfinite(v).all() for v in latest["state_dict"].values() if v.is_floating_point())
    with pytest.raises(NonFiniteLossError):
        calls["n"] = 0
        train(load_config(cfg_path), tmp_path / "again", device="cpu")
