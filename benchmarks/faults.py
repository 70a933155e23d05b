"""The fault bar: training on a generated tiny dataset under injected faults.

Each fault runs ``edaformer train`` in a subprocess (signals, kills, two runs at once, a full disk
made by failing writes with ENOSPC, damaged images / labels / checkpoints / logs, changed configs)
and checks what a user is left with. Prints a table: fault | outcome | iterations lost, where
"lost" is the number of trained iterations that a ``--resume auto`` has to redo.

    PYTHONPATH=src python benchmarks/faults.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ITERS, INTERVAL = 12, 4

# a runner that turns checkpoint writes into ENOSPC from the given write on (the disk is full)
FULL_DISK = """import errno, os, sys
import edaformer.checkpoint as checkpoint
real_fdopen, count, first_full = os.fdopen, [0], int(sys.argv.pop(1))
class Full:
    def __init__(self, f): self.f = f
    def write(self, data): raise OSError(errno.ENOSPC, "No space left on device")
    def __getattr__(self, name): return getattr(self.f, name)
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
def fdopen(fd, *a, **k):
    count[0] += 1
    f = real_fdopen(fd, *a, **k)
    return Full(f) if count[0] >= first_full else f
checkpoint.os.fdopen = fdopen
from edaformer.cli import main
sys.exit(main(sys.argv[1:]))
"""
# a runner whose checkpoint writes take long (to signal or kill one mid-write)
SLOW_SAVE = """import sys, time
import torch
real_save = torch.save
def slow_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    print("CHECKPOINT BYTES WRITTEN", file=sys.stderr, flush=True)
    time.sleep(60)
torch.save = slow_save
from edaformer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def make_dataset(root: Path, n: int = 6, size: int = 32) -> None:
    """Blocks of 4 colours; the label is the colour index."""
    rng = np.random.default_rng(0)
    colors = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 230, 40]], np.uint8)
    for i in range(n):
        label = np.kron(rng.integers(0, 4, (4, 4)), np.ones((size // 4, size // 4), np.int64)).astype(np.uint8)
        for split in ("train", "val"):
            for sub, arr in (("images", colors[label]), ("annotations", label)):
                (root / sub / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / sub / split / f"{i}.png")


def write_config(path: Path, data: Path, **train) -> Path:
    cfg = {"_base_": "_base_/default",  # the shipped defaults, by name
           "model": {"name": "edaformer-t-ade20k", "num_classes": 4, "drop_path_rate": 0.0},
           "data": {"type": "folder", "root": str(data), "classes": ["r", "g", "b", "y"], "img_suffix": ".png",
                    "scale": [32, 32], "ratio_range": [1.0, 1.0], "crop_size": [32, 32], "cat_max_ratio": 1.0,
                    "flip_prob": 0.0, "photometric": False, "batch_size": 2, "workers": 0},
           "schedule": {"iters": ITERS, "warmup_iters": 2},
           "train": {"checkpoint_interval": INTERVAL, "eval_interval": 0, "log_interval": 1, "keep_checkpoints": 2,
                     "deterministic": True, **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


class Trial:
    def __init__(self, root: Path):
        self.root, self.data = root, root / "data"
        make_dataset(self.data)
        self.cfg = write_config(root / "cfg.yaml", self.data)
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
        self.rows: list[tuple[str, str, str]] = []
        self.n = 0

    def work(self, name: str) -> Path:
        self.n += 1
        return self.root / f"{self.n:02d}-{name}"

    def start(self, work: Path, *extra: str, runner: str | None = None, cfg: Path | None = None) -> subprocess.Popen:
        head = [sys.executable, "-m", "edaformer"]
        if runner is not None:
            script = self.root / f"runner{abs(hash(runner))}.py"
            script.write_text(runner)
            head = [sys.executable, str(script), *(extra[:1] if runner is FULL_DISK else [])]
            extra = extra[1:] if runner is FULL_DISK else extra
        cmd = head + ["train", str(cfg or self.cfg), "--work-dir", str(work), "--device", "cpu", *extra]
        return subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def run(self, work: Path, *extra: str, **kw) -> tuple[int, str]:
        proc = self.start(work, *extra, **kw)
        _, err = proc.communicate(timeout=600)
        return proc.returncode, err

    def add(self, fault: str, outcome: str, lost: int | str) -> None:
        self.rows.append((fault, outcome, str(lost)))
        print(f"  {fault}: {outcome} (lost {lost})", file=sys.stderr, flush=True)


def last_logged(work: Path) -> int:
    if not (work / "log.jsonl").exists():
        return 0
    its = []
    for line in (work / "log.jsonl").read_text().splitlines():
        try:
            its.append(json.loads(line).get("iter", 0))
        except json.JSONDecodeError:
            pass
    return max(its, default=0)


def resume_point(work: Path) -> int:
    from edaformer.engine import find_resume_checkpoint

    found = find_resume_checkpoint(work)
    return int(found[1]["iteration"]) if found else 0


def wait_until(proc: subprocess.Popen, cond, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"run ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)


ROOT = ""


def last_line(err: str) -> str:
    """The last message line, with the trial folder shown as ``~``."""
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith(("train:", "verify"))]
    return lines[-1].replace(ROOT, "~") if lines else ""


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it (default: a temp dir)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="edaformer-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    global ROOT
    ROOT = str(root)
    t = Trial(root)
    print(f"fault trial in {root} (torch {torch.__version__})", file=sys.stderr)

    reference = t.work("uninterrupted")
    rc, err = t.run(reference)
    assert rc == 0, err[-2000:]

    # SIGKILL several times, one of them mid-write, then resume to the end
    work, lost, kills = t.work("sigkill"), [], 0
    for when in (3, 6, "mid-write", 10):
        proc = t.start(work, "--resume", "auto") if kills else t.start(work)
        if when == "mid-write":
            wait_until(proc, lambda: any(work.glob(".*.pth.*.tmp")))
        else:
            wait_until(proc, lambda: last_logged(work) >= when)
        done = last_logged(work)
        proc.kill()
        proc.wait()
        kills += 1
        lost.append(done - resume_point(work))
    rc, err = t.run(work, "--resume", "auto")
    same = all(torch.equal(a, b) for a, b in zip(weights(reference / "latest.pth").values(),
                                                  weights(work / "latest.pth").values()))
    t.add(f"SIGKILL x{kills} (one mid-write), then --resume auto",
          f"rc {rc}; final weights {'bit-identical to' if same else 'DIFFER from'} an uninterrupted run; "
          f"no partial file left: {not list(work.glob('.*.tmp'))}", "/".join(map(str, lost)) + f" (<= {INTERVAL})")

    for sig in (signal.SIGTERM, signal.SIGINT):
        work = t.work(sig.name)
        proc = t.start(work)
        wait_until(proc, lambda: last_logged(work) >= 2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        resumable = resume_point(work)
        hint = "--resume auto" in err
        t.add(f"{sig.name} ({'Ctrl-C' if sig == signal.SIGINT else 'preemption'})",
              f"rc {proc.returncode}; checkpoint at iteration {resumable}; resume command printed: {hint}",
              last_logged(work) - resumable)

    work = t.work("second-sigterm")
    proc = t.start(work, runner=SLOW_SAVE)
    wait_until(proc, lambda: last_logged(work) >= 1)
    proc.send_signal(signal.SIGTERM)
    line = ""
    while "CHECKPOINT BYTES WRITTEN" not in line:
        line = proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    t.add("second SIGTERM during the checkpoint write",
          f"rc {proc.returncode} after {time.monotonic() - t0:.1f} s; partial files: {len(list(work.glob('.*.tmp')))}",
          last_logged(work) - resume_point(work))

    work = t.work("full-disk")
    rc, err = t.run(work, "3", runner=FULL_DISK)   # writes 1-2: iter_4 + latest; from the 3rd on the disk is full
    t.add("disk full at the 2nd checkpoint (ENOSPC)",
          f"rc {rc}; '{last_line(err)[:120]}...'; latest.pth at iteration {resume_point(work)}",
          last_logged(work) - resume_point(work))

    work = t.work("concurrent")
    first = t.start(work)
    wait_until(first, lambda: (work / "train.lock").exists())
    rc, err = t.run(work, "--resume", "auto")
    first.communicate(timeout=600)
    t.add("two runs on one work dir at once", f"first rc {first.returncode}, second rc {rc}: '{last_line(err)[:120]}'", 0)
    rc, err = t.run(work)
    t.add("fresh run in a used work dir", f"rc {rc}: '{last_line(err)[:120]}...'", 0)
    rc, err = t.run(work, "--force")
    t.add("fresh run with --force", f"rc {rc}; earlier run moved to {[p.name for p in work.glob('previous-*')]}", 0)

    base = t.work("changed-config")
    rc, _ = t.run(base, "--set", "schedule.iters=4")
    for what, extra in (("optim.lr changed", ["--set", "schedule.iters=8", "optim.lr=1e-4"]),
                        ("another model", ["--set", "model.name=edaformer-b-ade20k"]),
                        ("another class count", ["--set", "model.num_classes=5"]),
                        ("schedule.iters below the checkpoint", ["--set", "schedule.iters=2"])):
        before = (base / "config.yaml").read_text()
        rc, err = t.run(base, "--resume", "auto", "-v", *extra)
        applied = [x.split("INFO ")[-1] for x in err.splitlines() if "config changed" in x]
        outcome = (f"rc {rc}; " + (applied[0][:90] if rc == 0 and applied else f"'{last_line(err)[:120]}...'")
                   + ("" if rc == 0 else f"; config.yaml untouched: {(base / 'config.yaml').read_text() == before}"))
        t.add(f"resume with {what}", outcome, 0)

    for what, damage, verify in (("truncated training image", "images/train/2.png", "fast"),
                                 ("truncated training image, --verify-data full", "images/train/2.png", "full"),
                                 ("bad label values in the val split", "annotations/val/1.png", "fast")):
        data = t.root / f"data-{t.n}"
        make_dataset(data)
        path = data / damage
        if "annotations" in damage:
            Image.fromarray(np.full((32, 32), 9, np.uint8)).save(path)
        else:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        cfg = write_config(t.root / f"cfg-{t.n}.yaml", data)
        work = t.work("bad-data")
        rc, err = t.run(work, "--verify-data", verify, cfg=cfg)
        t.add(what, f"rc {rc} after {last_logged(work)} iterations: '{last_line(err)[:120]}...'", last_logged(work))

    work = t.work("flip")
    rc, _ = t.run(work, "--set", "schedule.iters=8")
    latest = work / "latest.pth"
    with open(latest, "r+b") as f:
        f.seek(latest.stat().st_size // 2)
        f.write(os.urandom(4096))
    rc, err = t.run(work, "--resume", "auto", "--set", "schedule.iters=8")
    t.add("4 KB flipped inside latest.pth, then --resume auto",
          f"rc {rc}; {'detected, resumed from iter_8.pth' if 'is corrupt' in err else 'NOT detected'}", 0)

    work = t.work("torn-log")
    proc = t.start(work)
    wait_until(proc, lambda: last_logged(work) >= 6)
    proc.kill()
    proc.wait()
    with open(work / "log.jsonl", "a") as f:
        f.write('{"iter": 99, "lo')
    rc, _ = t.run(work, "--resume", "auto")
    its = [json.loads(x)["iter"] for x in (work / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    t.add("kill -9 + torn last log line, then --resume auto",
          f"rc {rc}; log.jsonl records unique: {len(its) == len(set(its)) == ITERS}; curves.png written: "
          f"{(work / 'curves.png').exists()}", 0)

    widths = [max(len(r[i]) for r in t.rows + [("fault", "outcome", "iterations lost")]) for i in range(3)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(("fault", "outcome", "iterations lost"), widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in t.rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


if __name__ == "__main__":
    main()
