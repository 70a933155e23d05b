"""Training under faults: signals, a second run in the same work dir, a changed config on resume,
bad data, a full disk, damaged checkpoints and logs. Signals are sent to a training subprocess."""
import errno
import fcntl
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
from PIL import Image

import edaformer
from edaformer.checkpoint import CorruptCheckpointError, read_checkpoint
from edaformer.cli import main as cli_main
from edaformer.config import load_config
from edaformer.data import DatasetError
from edaformer.engine import ResumeConfigError, checkpoint_payload, find_resume_checkpoint, train
from edaformer.plotting import read_log
from tests.helpers.training_data import make_dataset, state, subprocess_env, write_config


def _records(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]


def _iters(work: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in work.glob("iter_*.pth"))


@pytest.fixture()
def setup(tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    return data, write_config(tmp_path / "c.yaml", data, schedule={"iters": 4, "warmup_iters": 1},
                              train={"checkpoint_interval": 2, "keep_checkpoints": 0})


# -- 1. preemption ----------------------------------------------------------------------------------
SLOW_SECOND_SAVE = """import sys, time
import torch
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    print("CHECKPOINT BYTES WRITTEN", file=sys.stderr, flush=True)
    time.sleep(120)
torch.save = slow_save
from edaformer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(tmp_path: Path, cfg_path: Path, work: Path, script: str | None = None) -> subprocess.Popen:
    if script is None:
        cmd = [sys.executable, "-m", "edaformer"]
    else:
        (tmp_path / "run.py").write_text(script)
        cmd = [sys.executable, str(tmp_path / "run.py")]
    cmd += ["train", str(cfg_path), "--work-dir", str(work), "--device", "cpu"]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_training(proc: subprocess.Popen, work: Path) -> None:
    deadline = time.monotonic() + 240
    while not ((work / "log.jsonl").exists() and (work / "log.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path, signum, code):
    data = make_dataset(tmp_path / "data", n=4)
    cfg_path = write_config(tmp_path / "s.yaml", data, schedule={"iters": 10_000, "warmup_iters": 1},
                            train={"checkpoint_interval": 0})
    work = tmp_path / "work"
    proc = _start(tmp_path, cfg_path, work)
    _wait_for_training(proc, work)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    (stopped_at,) = _iters(work)
    ckpt = read_checkpoint(work / f"iter_{stopped_at}.pth")
    assert ckpt["iteration"] == stopped_at == state(work / "latest.pth")["iteration"]
    name = signal.Signals(signum).name
    assert f"edaformer train: stopped by {name} after iteration {stopped_at}; checkpoint " in err
    assert (f"continue with: edaformer train {cfg_path} --work-dir {work} --resume auto --device cpu"
            in err.splitlines())
    assert "Traceback" not in err and "\ninterrupted" not in err
    assert not list(work.glob(".*.tmp"))
    assert max(r["iter"] for r in _records(work)) == stopped_at


@pytest.mark.slow
def test_second_signal_during_the_save_aborts_without_a_partial_file(tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    cfg_path = write_config(tmp_path / "s.yaml", data, schedule={"iters": 10_000, "warmup_iters": 1},
                            train={"checkpoint_interval": 0})
    work = tmp_path / "work"
    proc = _start(tmp_path, cfg_path, work, SLOW_SECOND_SAVE)
    _wait_for_training(proc, work)
    proc.send_signal(signal.SIGTERM)
    seen = []
    while not any("CHECKPOINT BYTES WRITTEN" in line for line in seen):
        line = proc.stderr.readline()
        assert line, "".join(seen)[-3000:]
        seen.append(line)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    err = "".join(seen) + proc.communicate(timeout=60)[1]
    assert proc.returncode == 143 and time.monotonic() - t0 < 30
    assert "aborted by a second SIGTERM" in err and "--resume auto" in err and "Traceback" not in err
    assert sorted(p.name for p in work.iterdir()) == ["config.yaml", "log.jsonl", "train.lock"]


def test_partial_files_of_a_killed_run_are_removed_at_start(setup, tmp_path):
    data, cfg_path = setup
    work = tmp_path / "work"
    work.mkdir()
    stale = [work / ".iter_4.pth.k2j3h1.tmp", work / ".latest.pth.link", work / ".log.jsonl.x8a.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    train(load_config(cfg_path, ["schedule.iters=2"]), work, device="cpu")
    assert not any(p.exists() for p in stale) and _iters(work) == [2]


def test_time_based_checkpoints(setup, tmp_path):
    data, cfg_path = setup
    assert load_config(cfg_path)["train"]["checkpoint_minutes"] == 0
    work = tmp_path / "work"
    train(load_config(cfg_path, ["train.checkpoint_interval=0", "train.checkpoint_minutes=1e-6"]), work,
          device="cpu")
    assert _iters(work) == [1, 2, 3, 4]          # every step is past the (tiny) time interval
    with pytest.raises(ValueError, match="checkpoint_minutes must be a number >= 0"):
        load_config(cfg_path, ["train.checkpoint_minutes=-1"])


# -- 2. one run per work dir ------------------------------------------------------------------------
def test_fresh_run_in_a_used_work_dir_is_refused_unless_forced(setup, tmp_path, capsys, caplog):
    data, cfg_path = setup
    work = tmp_path / "work"
    args = ["train", str(cfg_path), "--work-dir", str(work), "--device", "cpu", "--set", "schedule.iters=2"]
    assert cli_main(args) == 0
    capsys.readouterr()
    before = (work / "log.jsonl").read_text()
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"edaformer train: error: work dir {work} holds an earlier run (iter_2.pth")
    assert "--resume auto" in err and "--force" in err and len(err.splitlines()) == 1
    assert (work / "log.jsonl").read_text() == before                    # nothing touched
    with caplog.at_level("WARNING", logger="edaformer"):
        assert cli_main(args + ["--force"]) == 0
    (aside,) = work.glob("previous-*")
    assert {p.name for p in aside.iterdir()} == {"iter_2.pth", "latest.pth", "best_mIoU.pth", "config.yaml",
                                                 "log.jsonl", "curves.png"}
    assert "moved 6 files of the earlier run" in caplog.text and str(aside) in caplog.text
    assert [r["iter"] for r in _records(work) if "loss" in r] == [1, 2]   # a new log, not appended


def test_a_second_run_on_a_locked_work_dir_exits_with_a_clear_message(setup, tmp_path, capsys):
    data, cfg_path = setup
    work = tmp_path / "work"
    work.mkdir()
    with open(work / "train.lock", "w") as held:                         # another run holds the lock
        held.write("pid 12345 on elsewhere\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli_main(["train", str(cfg_path), "--work-dir", str(work), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"work dir {work} is in use by another training run (pid 12345 on elsewhere" in err
        assert not (work / "log.jsonl").exists() and not (work / "config.yaml").exists()
    train(load_config(cfg_path, ["schedule.iters=1"]), work, device="cpu")  # free again


# -- 3. resume with a changed config ----------------------------------------------------------------
def test_resume_applies_optimizer_changes_and_refuses_model_changes(setup, tmp_path, caplog):
    data, cfg_path = setup
    work = tmp_path / "work"
    train(load_config(cfg_path, ["schedule.iters=2"]), work, device="cpu")
    config_before = (work / "config.yaml").read_text()
    for overrides, match in ((["model.name=edaformer-b-ade20k"], "model.name is 'edaformer-b-ade20k' but "
                                                                 "'edaformer-t-ade20k' in the checkpoint"),
                             (["model.decoder_depths=1,1,1"], r"model.decoder_depths is \[1, 1, 1\] but None"),
                             (["schedule.iters=1"], r"schedule.iters=1 is below the iteration of .*latest.pth \(2\)")):
        with pytest.raises(ResumeConfigError, match=match):
            train(load_config(cfg_path, overrides), work, resume="auto", device="cpu")
    assert (work / "config.yaml").read_text() == config_before           # checked before anything is written
    with caplog.at_level("INFO", logger="edaformer"):
        train(load_config(cfg_path, ["optim.lr=3e-4", "schedule.iters=4"]), work, resume="auto", device="cpu")
    assert "config changed since latest.pth: optim.lr: 0.0001 -> 0.0003 (applied)" in caplog.text
    assert "schedule.iters: 2 -> 4 (applied)" in caplog.text
    lr3 = [r["lr"] for r in _records(work) if r.get("iter") == 3 and "lr" in r]
    assert lr3 == [pytest.approx(3e-4 * (1 - 2 / 4))]                    # the new lr is used
    assert state(work / "latest.pth")["config"]["optim"]["lr"] == 3e-4


# -- 4. bad data ------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_training_image_is_named(setup, tmp_path, workers, capsys):
    data, cfg_path = setup
    bad = data / "images" / "train" / "2.png"
    bad.write_bytes(bad.read_bytes()[:200])
    # the header is intact, so only a full check or the read itself finds it
    rc = cli_main(["train", str(cfg_path), "--work-dir", str(tmp_path / "w"), "--device", "cpu",
                   "--set", f"data.workers={workers}", "--verify-data", "fast"])
    err = capsys.readouterr().err
    line = err.splitlines()[-1]                        # after the progress bar
    assert rc == 2 and line.startswith("edaformer train: error: cannot read image ") and str(bad) in line
    assert "Traceback" not in err
    rc = cli_main(["train", str(cfg_path), "--work-dir", str(tmp_path / "w2"), "--device", "cpu",
                   "--verify-data", "full"])
    err = capsys.readouterr().err
    assert rc == 2 and "1 problem(s) in 4 samples" in err and str(bad) in err
    assert not (tmp_path / "w2" / "log.jsonl").exists()                  # before the first step


def test_a_bad_validation_label_is_found_before_training(setup, tmp_path):
    data, cfg_path = setup
    bad = data / "annotations" / "val" / "1.png"
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(bad)
    with pytest.raises(DatasetError, match=rf"label {bad} has values \[9\] outside \[0, 4\)"):
        train(load_config(cfg_path), tmp_path / "w", device="cpu")
    assert not (tmp_path / "w" / "log.jsonl").exists() and not _iters(tmp_path / "w")
    # unchecked, it is found at the first validation, after that iteration's checkpoint is written
    with pytest.raises(DatasetError, match=r"validation at iteration 2; the checkpoint .*iter_2.pth was written"):
        train(load_config(cfg_path, ["train.eval_interval=2"]), tmp_path / "w", device="cpu", verify_data="off")
    assert _iters(tmp_path / "w") == [2]


# -- 5. full disk -----------------------------------------------------------------------------------
class _FullDisk:
    """A file object that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_keeps_the_last_checkpoint_and_says_so(setup, tmp_path, monkeypatch, capsys):
    data, cfg_path = setup
    import edaformer.checkpoint as checkpoint

    work = tmp_path / "work"
    real_fdopen, saves = os.fdopen, []

    def fdopen(fd, *args, **kwargs):                   # the disk fills up at the second checkpoint
        f = real_fdopen(fd, *args, **kwargs)
        saves.append(fd)
        return _FullDisk(f, 10_000) if len(saves) > 2 else f

    monkeypatch.setattr(checkpoint.os, "fdopen", fdopen)
    rc = cli_main(["train", str(cfg_path), "--work-dir", str(work), "--device", "cpu"])
    err = capsys.readouterr().err
    line = err.splitlines()[-1]                        # after the progress bar
    assert rc == 1
    assert line.startswith(f"edaformer train: error: no space left on device while writing {work / 'iter_4.pth'}")
    assert f"the last complete checkpoint is {work / 'iter_2.pth'}" in line and "--resume auto" in line
    assert "inline_container" not in err and "Traceback" not in err
    assert _iters(work) == [2] and state(work / "latest.pth")["iteration"] == 2
    assert not list(work.glob(".*.tmp"))


def test_low_free_space_is_warned_at_start(setup, tmp_path, monkeypatch, caplog):
    data, cfg_path = setup
    import shutil

    import edaformer.engine.workdir as workdir

    monkeypatch.setattr(workdir.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    with caplog.at_level("WARNING", logger="edaformer"):
        train(load_config(cfg_path, ["schedule.iters=1"]), tmp_path / "w", device="cpu")
    assert "only 1.0 MB free in" in caplog.text and "each checkpoint needs about" in caplog.text


# -- 6. small things that lose or muddle data -------------------------------------------------------
def test_latest_is_an_independent_copy_and_files_follow_the_umask(setup, tmp_path):
    data, cfg_path = setup
    work = tmp_path / "work"
    old = os.umask(0o002)
    try:
        train(load_config(cfg_path), work, device="cpu")
    finally:
        os.umask(old)
    latest, newest = work / "latest.pth", work / "iter_4.pth"
    assert not os.path.samefile(latest, newest) and latest.read_bytes() == newest.read_bytes()
    assert {oct(p.stat().st_mode & 0o777) for p in work.glob("*.pth")} == {"0o664"}
    with open(newest, "r+b") as f:                     # damage one: the other is intact
        f.seek(newest.stat().st_size // 2)
        f.write(os.urandom(4096))
    with pytest.raises(CorruptCheckpointError, match=f"checkpoint {newest} is corrupt"):
        read_checkpoint(newest)
    assert read_checkpoint(latest)["iteration"] == 4


def test_a_4kb_flip_is_caught_by_the_checksum(tmp_path, caplog):
    torch.manual_seed(0)
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=4)
    payload = {**checkpoint_payload(model, {"iteration": 4}), "iteration": 4}
    path = edaformer.save_checkpoint(payload, tmp_path / "latest.pth")
    edaformer.save_checkpoint({**payload, "iteration": 2}, tmp_path / "iter_2.pth")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        block = bytearray(f.read(4096))
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in block))
    assert torch.load(path, weights_only=True)["iteration"] == 4        # torch itself does not notice
    with pytest.raises(CorruptCheckpointError):
        read_checkpoint(path)
    found, ckpt = find_resume_checkpoint(tmp_path)
    assert found.name == "iter_2.pth" and "latest.pth is corrupt" in caplog.text


def test_resume_truncates_the_log_to_the_checkpoint(setup, tmp_path):
    data, cfg_path = setup
    work = tmp_path / "work"
    train(load_config(cfg_path, ["schedule.iters=3"]), work, device="cpu")
    for name in ("iter_3.pth", "latest.pth"):          # killed after logging iteration 3, before its checkpoint
        (work / name).unlink()
    with open(work / "log.jsonl", "a") as f:
        f.write('{"iter": 4, "loss": 0.')              # and a torn last write
    train(load_config(cfg_path, ["schedule.iters=3"]), work, resume="auto", device="cpu")
    records = _records(work)
    assert [r["iter"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["iter"] for r in records if r.get("mode") == "val"] == [3]


def test_read_log_skips_a_torn_last_line_and_names_the_file(tmp_path, caplog):
    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 1, "loss": 1.0}\n{"iter": 2, "mode": "val", "mIoU": 0.5}\n{"iter": 3, "lo')
    train_records, val = read_log(log)
    assert [r["iter"] for r in train_records] == [1] and [r["iter"] for r in val] == [2]
    assert str(log) in caplog.text and "line 3" in caplog.text
    log.write_text('{"iter": 1, "loss": 1.0}\nnot json\n{"iter": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=rf"{log} line 2 is not a JSON record"):
        read_log(log)
