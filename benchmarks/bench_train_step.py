"""One training step split into its parts, for several speed options timed round-robin in one process.

A step is what ``edaformer train`` does per iteration: take the next batch from the training
loader (**data**), move it to the device in the variant's memory format (**input**), forward and
loss (**forward**), ``zero_grad`` and backward (**backward**), AdamW step, schedule step and, for
``ema``, the EMA update (**optimizer**). Model, optimizer, schedule and loss come from the
library's builders and a training config (default: the EDAFormer-T CamVid recipe), so a variant
is exactly a config change:

* ``baseline``: the config as it is (``optim.impl: auto``: a per-parameter loop on CPU, foreach on CUDA);
* ``loop`` / ``foreach`` / ``fused``: ``optim.impl`` (AdamW's kernels);
* ``channels_last``, ``channels_last+fused``: ``train.channels_last: true`` (and fused AdamW);
* ``ema``: ``train.ema: true`` (the cost of the EMA update);
* ``grad_checkpointing``: ``train.grad_checkpointing: true``.

Every variant holds its own copy of the same initial weights. Each round runs one step of every
variant, the order alternating between rounds (as ``edaformer.bench.time_interleaved`` does), so
a slow phase of a shared machine slows them alike; each step takes the next batch of the one
loader. Data comes from the real training loader (the config's augmentation) when ``--data`` is
a dataset folder (default: ``../shared/datasets/camvid`` beside the repository, if present), else
from random synthetic batches (data time then ~0). With ``--workers 0`` the data column is the
full cost of loading and augmenting a batch in the training process; with workers (persistent,
as in training) it is the time spent waiting for them.

    python benchmarks/bench_train_step.py --size 352 --batch 8 --threads 2 --iters 20
    python benchmarks/bench_train_step.py --variants baseline,fused --iters 2 --size 64 --data synthetic
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import edaformer  # noqa: E402
from edaformer import bench as bm  # noqa: E402
from edaformer.config import load_config  # noqa: E402
from edaformer.engine.builders import (build_datasets, build_model, build_optimizer, build_scheduler,  # noqa: E402
                                       build_train_loader, resolve_amp)
from edaformer.engine.losses import build_loss, segmentation_loss  # noqa: E402
from edaformer.utils import resolve_device  # noqa: E402

import harness  # noqa: E402

REPO = HERE.parent
CONFIG_NAME = "edaformer-t-camvid.yaml"
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "camvid"
PHASES = ("data", "input", "forward", "backward", "optimizer")

# variant -> the config overrides that make it
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "loop": {"optim.impl": "loop"},
    "foreach": {"optim.impl": "foreach"},
    "fused": {"optim.impl": "fused"},
    "channels_last": {"train.channels_last": True},
    "channels_last+fused": {"train.channels_last": True, "optim.impl": "fused"},
    "ema": {"train.ema": True},
    "grad_checkpointing": {"train.grad_checkpointing": True},
}
DEFAULT_VARIANTS = "baseline,foreach,fused,channels_last,channels_last+fused,ema"


def default_config() -> Path:
    """The EDAFormer-T CamVid recipe, beside the package or inside it."""
    for path in (REPO / "configs" / CONFIG_NAME, Path(edaformer.__file__).parent / "configs" / CONFIG_NAME):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{CONFIG_NAME} not found; pass --config")


# -- data ---------------------------------------------------------------------------------------
def real_batches(cfg: Mapping[str, Any]) -> tuple[Iterator, Any]:
    """Endless batches of the config's training loader (persistent workers when ``data.workers`` > 0)."""
    train_set, _ = build_datasets(cfg["data"])
    loader = build_train_loader(train_set, cfg["data"], False, cfg["train"]["seed"])
    return itertools.chain.from_iterable(iter(loader) for _ in itertools.count()), train_set


def synthetic_batches(batch: int, size: tuple[int, int], num_classes: int) -> Iterator:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, *size, generator=g)
    labels = torch.randint(0, num_classes, (batch, *size), generator=g)
    labels[:, :8] = 255  # some ignored pixels, as in padded crops
    return itertools.repeat((images, labels))


# -- one variant ----------------------------------------------------------------------------------
def make_step(cfg: Mapping[str, Any], num_classes: int, criterion: Any, device: torch.device,
              base_state: Mapping[str, torch.Tensor]) -> Callable[[Iterator], dict[str, float]]:
    """The training step of config ``cfg`` as a callable that returns its phase times (seconds)."""
    from timm.utils import ModelEmaV3

    tcfg = cfg["train"]
    model = build_model(cfg["model"], num_classes, init_weights=False)
    model.load_state_dict(base_state)
    model.set_grad_checkpointing(tcfg["grad_checkpointing"])
    model.to(device)
    memory_format = torch.channels_last if tcfg["channels_last"] else torch.preserve_format
    if tcfg["channels_last"]:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg["optim"])
    scheduler = build_scheduler(optimizer, cfg["schedule"])
    amp = resolve_amp(tcfg["amp"], device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    ema = ModelEmaV3(model, decay=tcfg["ema_decay"]) if tcfg["ema"] else None
    dtype = next(model.parameters()).dtype
    model.train()
    steps = itertools.count(1)

    def clock() -> float:
        bm.synchronize(device)
        return time.perf_counter()

    def step(batches: Iterator) -> dict[str, float]:
        t0 = clock()
        images, labels = next(batches)
        t1 = clock()
        images = images.to(device, dtype=dtype, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True).long()
        t2 = clock()
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            logits = model(images)
        loss = segmentation_loss(logits, labels, criterion) if isinstance(criterion, int) else criterion(logits, labels)
        loss_value = loss.item()
        t3 = clock()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        t4 = clock()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(model, step=next(steps))
        t5 = clock()
        if not torch.isfinite(torch.tensor(loss_value)):
            raise FloatingPointError(f"loss is {loss_value}")
        return dict(data=t1 - t0, input=t2 - t1, forward=t3 - t2, backward=t4 - t3, optimizer=t5 - t4)
    return step


def time_round_robin(steps: Mapping[str, Callable[[Iterator], dict[str, float]]], batches: Iterator, iters: int,
                     warmup: int) -> dict[str, dict[str, list[float]]]:
    """Phase times per variant: ``warmup`` untimed rounds, then ``iters`` rounds of one step per
    variant, the order alternating between rounds; also the process CPU time of each step."""
    names = list(steps)
    times = {name: {key: [] for key in (*PHASES, "step", "cpu")} for name in names}
    for i in range(warmup + iters):
        for name in (names if i % 2 == 0 else names[::-1]):
            c0 = time.process_time()
            phases = steps[name](batches)
            cpu = time.process_time() - c0
            if i >= warmup:
                for key, value in phases.items():
                    times[name][key].append(value)
                times[name]["step"].append(sum(phases.values()))
                times[name]["cpu"].append(cpu)
    return times


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    size = (args.size[0], args.size[1])
    data_path = None if args.data == "synthetic" else Path(args.data)
    real = data_path is not None and (data_path / "images").is_dir()
    overrides = [f"data.batch_size={args.batch}", f"data.crop_size={size[0]},{size[1]}", f"data.workers={args.workers}",
                 f"schedule.iters={max(args.iters + args.warmup, 1) * 10}", *args.set]
    if real:
        overrides.append(f"data.root={data_path}")
    if args.amp:
        overrides.append(f"train.amp={args.amp}")
    config = Path(args.config) if args.config else default_config()
    cfg = load_config(config, overrides)
    if real:
        batches, train_set = real_batches(cfg)
        num_classes, source = train_set.num_classes, f"{data_path} (training loader, {args.workers} workers)"
        criterion = build_loss(cfg.get("loss"), train_set, train_set.ignore_index)
    else:
        num_classes = cfg["model"]["num_classes"] or 11
        batches, source, criterion = synthetic_batches(args.batch, size, num_classes), "synthetic", 255
    torch.manual_seed(cfg["train"]["seed"])
    base_state = copy.deepcopy(build_model(cfg["model"], num_classes, init_weights=False).state_dict())
    steps, skipped = {}, {}
    for name in args.variants:
        changed = load_config(config, overrides + [f"{k}={str(v).lower()}" for k, v in VARIANTS[name].items()])
        try:
            steps[name] = make_step(changed, num_classes, criterion, device, base_state)
        except (ValueError, RuntimeError) as e:
            skipped[name] = str(e)
            print(f"{name}: skipped ({e})", file=sys.stderr)
    times = time_round_robin(steps, batches, args.iters, args.warmup)
    rows = []
    for name, t in times.items():
        row = dict(variant=name, **{f"{k}_s": bm.Timing(v).median for k, v in t.items() if k != "cpu"},
                   step_iqr_s=bm.Timing(t["step"]).iqr, cpu_s=bm.Timing(t["cpu"]).median)
        row["images_per_s"] = args.batch / row["step_s"]
        rows.append(row)
    if rows and rows[0]["variant"] == "baseline":
        for row in rows:
            row["vs_baseline"] = row["step_s"] / rows[0]["step_s"]
    return dict(environment=bm.environment(), command=" ".join(sys.argv), config=str(config), data=source,
                model=cfg["model"]["name"], batch=args.batch, size=list(size), iters=args.iters, warmup=args.warmup,
                device=device.type, rows=rows, skipped=skipped, times=times)


COLUMNS = [("variant", "variant", ""), ("data_s", "data s", ".3f"), ("input_s", "input s", ".3f"),
           ("forward_s", "forward s", ".3f"), ("backward_s", "backward s", ".3f"),
           ("optimizer_s", "optimizer s", ".3f"), ("step_s", "step s", ".3f"), ("step_iqr_s", "step IQR s", ".3f"),
           ("cpu_s", "CPU s/step", ".3f"), ("images_per_s", "img/s", ".2f"), ("vs_baseline", "step vs baseline", ".3f")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help=f"training config (default: {CONFIG_NAME})")
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="dataset root for the real training loader, or 'synthetic' (default: %(default)s if present)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: {DEFAULT_VARIANTS})")
    p.add_argument("--size", default="352", help="training crop H[xW] (default 352)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--iters", type=int, default=20, help="timed rounds: steps per variant (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--workers", type=int, default=0, help="loader workers (default 0: data time is the full cost)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="train.amp (CUDA only)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides for every variant")
    p.add_argument("--json", default=None, metavar="PATH", help="also write JSON ('-': stdout only)")
    args = p.parse_args(argv)
    h, _, w = args.size.lower().partition("x")
    args.size = (int(h), int(w or h))
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    result = run(args)
    env = result["environment"]
    text = "\n".join([
        f"`{result['command']}`", "",
        f"{env['date']}; torch {env['torch']}; {env.get('cuda_device') or env['cpu']} ({env['cpu_count']} cores, "
        f"{env['torch_threads']} torch thread(s)); {result['model']}, batch {args.batch} x {args.size[0]}x{args.size[1]}, "
        f"data: {result['data']}; medians of {args.iters} steps per variant after {args.warmup} warm-up round(s), "
        "interleaved", "", bm.format_table(result["rows"], COLUMNS)])
    harness.emit_report(result, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
