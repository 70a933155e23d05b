"""The training loop: single process vs DDP, exact resume after SIGKILL, gradient checkpointing,
AMP fallback, a raised schedule, overfitting, the NaN stop; on tiny folder datasets in tmp_path."""
import importlib
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import edaformer
from edaformer.cli import main as cli_main
from edaformer.config import load_config
from edaformer.data import make_palette
from edaformer.effective import effective_config
from edaformer.engine import NonFiniteLossError, segmentation_loss, train
from tests.helpers.training_data import make_dataset, max_diff, state, subprocess_env, write_config

DOUBLE_TRAIN = """import sys
import torch
torch.set_default_dtype(torch.float64)
from edaformer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture()
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, float64):
    """2 processes x 2 images (gloo, SyncBN) == 1 process x 4 images after 3 iterations, both in
    float64 (models created under ``torch.set_default_dtype(torch.float64)``; the loop feeds the
    inputs in the model's dtype), so the bound is 1e-9 rather than a float32 rounding bound.

    AdamW's eps is raised to 1e-4 here: with eps 1e-8 Adam turns rounding-level gradient
    differences of entries whose gradient is ~0 (e.g. the last decoder blocks' fc2 biases,
    whose true gradient is exactly 0 because the fuse BatchNorm removes any constant shift)
    into full +-lr steps, which would hide what this test checks."""
    data = make_dataset(tmp_path / "data", n=4)
    cfg_path = write_config(tmp_path / "ddp.yaml", data, optim={"lr": 1e-4, "eps": 1e-4},
                            schedule={"iters": 3, "warmup_iters": 0}, train={"checkpoint_interval": 0})
    script = tmp_path / "train64.py"
    script.write_text(DOUBLE_TRAIN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           "train", str(cfg_path), "--work-dir", str(tmp_path / "ddp"), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the single-process run with the same global batch, meanwhile
    cfg = load_config(cfg_path, ["data.batch_size=4"])
    train(cfg, tmp_path / "single", device="cpu")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "batch 2 x 2 processes = 4" in out
    ddp, single = state(tmp_path / "ddp" / "latest.pth"), state(tmp_path / "single" / "latest.pth")
    assert ddp["iteration"] == single["iteration"] == 3 and len(ddp["rng"]) == 2
    assert ddp["state_dict"]["decoder.classifier.weight"].dtype == torch.float64
    diff = max_diff(ddp["state_dict"], single["state_dict"])
    torch.manual_seed(0)  # the run's seed: the same initial weights
    init = dict(edaformer.create_model("edaformer-t-ade20k", num_classes=4).named_parameters())
    moved = max((single["state_dict"][k] - p.detach()).abs().max().item() for k, p in init.items())
    print(f"DDP (2x2) vs single (1x4), float64: max weight difference {diff:.2e} (weights moved up to {moved:.2e})")
    assert diff < 1e-9 and moved > 1e-4
    # validation is split over the ranks and the counts all-reduced: same metrics
    val = lambda p: [json.loads(line) for line in p.read_text().splitlines() if '"val"' in line][-1]
    assert val(tmp_path / "ddp" / "log.jsonl")["mIoU"] == pytest.approx(val(tmp_path / "single" / "log.jsonl")["mIoU"],
                                                                         abs=1e-9)


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
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
    (work / "latest.pth").unlink(missing_ok=True)               # a corrupt newest checkpoint is skipped
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
    assert load_config(tmp_path / "plain" / "config.yaml") == effective_config(load_config(cfg_path))
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

    def loss_going_nan(logits, labels, *args):
        calls["n"] += 1
        loss = real_loss(logits, labels, *args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(importlib.import_module("edaformer.engine.losses"), "segmentation_loss", loss_going_nan)
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


def test_config_yaml_holds_every_value_used_and_resumes(tmp_path):
    """Keys left unset (test box, window, stride, classes, palette, model options) are written with
    the values used; the run continues from that file as from its own config."""
    import yaml

    data = make_dataset(tmp_path / "data", n=2)
    cfg_path = write_config(tmp_path / "c.yaml", data, schedule={"iters": 1, "warmup_iters": 0},
                            train={"eval_interval": 0, "deterministic": False})
    cfg = load_config(cfg_path)
    assert "test_scale" not in cfg["data"] and cfg["eval"]["stride"] is None
    train(cfg, tmp_path / "run", device="cpu", verify_data="off")
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["data"]["test_scale"] == [32, 32] and written["data"]["size_divisor"] == 32
    assert written["eval"]["crop_size"] == [32, 32] and written["eval"]["stride"] == [21, 21]
    assert written["data"]["palette"] == [list(c) for c in make_palette(4)]
    assert written["data"]["train_split"] == "train" and written["model"]["decoder_depths"] == [3, 2, 1]
    assert load_config(tmp_path / "run" / "config.yaml") == effective_config(cfg)
    result = train(load_config(tmp_path / "run" / "config.yaml", ["schedule.iters=2"]), tmp_path / "run",
                   resume="auto", device="cpu", verify_data="off")
    assert result["iteration"] == 2


def test_warmup_as_long_as_the_run_and_too_many_workers_are_said_once(tmp_path, caplog, monkeypatch, recwarn):
    """Each warning names the key and the fix, once per run; the loaders get at most one worker
    per CPU, so torch has nothing to warn about."""
    import edaformer.data

    monkeypatch.setattr(edaformer.data, "cpu_count", lambda: 1)
    data = make_dataset(tmp_path / "data", n=2)
    cfg_path = write_config(tmp_path / "w.yaml", data, data={"workers": 3}, schedule={"iters": 2, "warmup_iters": 2},
                            train={"eval_interval": 1, "deterministic": False})
    caplog.set_level("INFO", logger="edaformer")
    train(load_config(cfg_path), tmp_path / "run", device="cpu", verify_data="off")
    warmup = "schedule.warmup_iters (2) >= schedule.iters (2): the learning rate never reaches optim.lr; " \
             "set schedule.warmup_iters below 2"
    workers = "data.workers is 3 but this machine has 1 CPU: using 1 loader worker (set data.workers to at most 1)"
    assert caplog.text.count(warmup) == 1 and caplog.text.count(workers) == 1
    assert caplog.text.count("validation:") == 2  # both validations ran with the reduced count
    assert not [w for w in recwarn if "worker" in str(w.message)]
