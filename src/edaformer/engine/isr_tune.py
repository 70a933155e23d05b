"""The ISR auto-tuner: the best ISR setting of a trained model within a budget.

Search space: a grid of ISR settings, by default every combination of the factors ``{1, 2}``
over the 7 positions (encoder stages 1-4, decoder levels c2-c4: 2^7 = 128 settings), or the
paper's four settings (:data:`edaformer.isr.PAPER_ISR_SWEEP`). ``1111-111`` (the training
ratios) is always added: it is the reference of ``change`` and of ``max_drop``.

Strategy (exact for the grid, fewer evaluations than trying all):

1. GFLOPs of every setting from :func:`edaformer.flops.gflops` on a ``meta`` copy (cheap);
   settings whose pooling does not fit the input size are left out.
2. For a latency budget, the latency of every setting at that size on this device (interleaved,
   a few runs each); otherwise only that of the settings in the final table.
3. mIoU only where it can decide the answer:

   * ``gflops`` / ``ms`` budget: every setting within the budget (any of them may score best),
     plus ``1111-111``; the answer is the highest mIoU, ties to fewer GFLOPs.
   * ``max_drop`` D (mIoU points): ``1111-111`` first, then the settings by rising GFLOPs; the
     first GFLOPs level holding a setting within D of ``1111-111`` ends the search (every cheaper
     setting was evaluated and dropped more). Ties to the higher mIoU.

The evaluation protocol is reached through :func:`score_setting` alone.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..bench import format_table, forward_fn, make_input, time_interleaved
from ..checkpoint import read_checkpoint, save_checkpoint
from ..flops import gflops as count_gflops
from ..isr import PAPER_ISR_SWEEP, TRAINING_ISR, parse_isr
from ..meta import ISR, ISR_POOL, ISR_TUNE
from ..plotting import plot_pareto
from .evaluate import evaluate

__all__ = ["Budget", "Candidate", "TuneResult", "grid_settings", "calibration_subset", "measure_gflops",
           "measure_latency", "search", "pareto_front", "tune_isr", "apply_isr", "score_setting",
           "write_isr_checkpoint", "default_write_path",
           "format_pareto_table", "plot_result", "parse_factors", "BUDGET_KINDS", "MAX_GRID"]

log = logging.getLogger("edaformer")

REFERENCE = str(TRAINING_ISR)
BUDGET_KINDS = ("gflops", "ms", "max_drop")
MAX_GRID = 3 ** 7  # factors {1, 2, 4} over the 7 positions

Timer = Callable[[nn.Module, Sequence[str]], Mapping[str, float]]
Scorer = Callable[[str], float]


# -- search space ------------------------------------------------------------------------------
def grid_settings(factors: Sequence[int] = (1, 2), grid: str | None = None) -> list[str]:
    """The settings searched: ``grid="paper"`` for the paper's four, else every combination of
    ``factors`` over the 4 encoder stages and 3 decoder levels; ``1111-111`` always included."""
    if grid == "paper":
        settings = [str(parse_isr(s)) for s in PAPER_ISR_SWEEP]
    elif grid is not None:
        raise ValueError(f"unknown ISR grid {grid!r}; choose 'paper' or give factors")
    else:
        values = sorted({int(f) for f in factors})
        if not values or values[0] < 1:
            raise ValueError(f"ISR factors must be integers >= 1, got {list(factors)!r}")
        if len(values) ** 7 > MAX_GRID:
            raise ValueError(f"ISR factors {values} give {len(values) ** 7} settings; at most {MAX_GRID} "
                             "(3 factors) are searched")
        settings = [str(parse_isr(combo)) for combo in itertools.product(values, repeat=7)]
    return settings if REFERENCE in settings else [REFERENCE, *settings]


def parse_factors(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]``; a bad list raises ``ValueError`` naming it."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"--factors {text!r}: expected a comma-separated list of integers >= 1, e.g. 1,2")
    return values


def calibration_subset(dataset: Dataset, n: int | None) -> Dataset:
    """``n`` images spread evenly over ``dataset`` (all of it for None or ``n >= len``)."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ValueError(f"the calibration set needs at least 1 image, got {n}")
    total = len(dataset)
    return Subset(dataset, [i * total // n for i in range(n)])


# -- budgets, candidates, the result ------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """``gflops`` (at most that many GFLOPs), ``ms`` (at most that latency on this device) or
    ``max_drop`` (at most that many mIoU points below ``1111-111``)."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"unknown budget {self.kind!r}; choose one of {', '.join(BUDGET_KINDS)}")
        if not math.isfinite(self.value) or self.value < 0 or (self.kind != "max_drop" and self.value == 0):
            expected = "a number >= 0" if self.kind == "max_drop" else "a positive number"
            raise ValueError(f"the {self.kind} budget must be {expected}, got {self.value}")

    def __str__(self) -> str:
        return {"gflops": f"<= {self.value:g} GFLOPs", "ms": f"<= {self.value:g} ms",
                "max_drop": f"mIoU drop <= {self.value:g} points"}[self.kind]


@dataclass
class Candidate:
    """One setting: ``gflops`` at the counted size, ``ms`` (None: not timed), ``mIoU`` as a
    fraction (None: not evaluated)."""

    isr: str
    gflops: float
    ms: float | None = None
    mIoU: float | None = None


@dataclass
class TuneResult:
    """The search outcome: every candidate, the chosen setting, the reference mIoU."""

    budget: Budget
    candidates: list[Candidate]
    chosen: Candidate
    reference: Candidate
    flops_input_size: tuple[int, int] | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def evaluated(self) -> list[Candidate]:
        return [c for c in self.candidates if c.mIoU is not None]

    @property
    def front(self) -> list[Candidate]:
        """The Pareto front of the evaluated settings on the budget's cost (ms for a latency budget)."""
        return pareto_front(self.evaluated, cost="ms" if self.budget.kind == "ms" else "gflops")

    def table_rows(self) -> list[dict[str, Any]]:
        """The front plus the chosen and reference settings, most expensive first."""
        shown = {c.isr: c for c in [*self.front, self.chosen, self.reference]}
        ref = self.reference.mIoU
        rows = []
        for c in sorted(shown.values(), key=lambda c: (-c.gflops, c.isr)):
            note = "chosen" if c.isr == self.chosen.isr else ("reference" if c.isr == self.reference.isr else "")
            rows.append(dict(isr=c.isr, gflops=c.gflops, ms=c.ms, mIoU=c.mIoU, change=c.mIoU - ref, note=note))
        return rows

    def summary(self) -> dict[str, Any]:
        """The chosen setting as one JSON object: ``isr``, ``gflops``, ``ms``, ``mIoU`` (a fraction)."""
        c = self.chosen
        return {"isr": c.isr, "gflops": c.gflops, "ms": c.ms, "mIoU": c.mIoU}

    def to_dict(self) -> dict[str, Any]:
        return dict(budget=asdict(self.budget), chosen=self.summary(), reference=asdict(self.reference),
                    flops_input_size=list(self.flops_input_size) if self.flops_input_size else None,
                    candidates=[asdict(c) for c in self.candidates], skipped=list(self.skipped),
                    evaluated=len(self.evaluated))


# -- costs -----------------------------------------------------------------------------------------
def apply_isr(model: nn.Module, setting: str, pool: str | None = None) -> nn.Module:
    """``model.set_isr(setting)``, passing ``pool=`` only when given or when the model has a pool
    kind of its own (``model.isr_pool``, kept)."""
    pool = pool if pool is not None else getattr(model, "isr_pool", None)
    if pool is None:
        model.set_isr(setting)
        return model
    if "pool" not in inspect.signature(model.set_isr).parameters:
        raise ValueError(f"--pool {pool}: {type(model).__name__}.set_isr takes no pool option in this version")
    model.set_isr(setting, pool=pool)
    return model


def measure_gflops(model: nn.Module, settings: Sequence[str], size: Sequence[int],
                   pool: str | None = None) -> tuple[dict[str, float], list[str]]:
    """GFLOPs per setting at ``size`` (:func:`edaformer.flops.gflops`, as ``edaformer flops`` counts
    them), on one ``meta`` copy; and the settings left out because their pooling does not fit ``size``."""
    meta = copy.deepcopy(model).to("meta")
    out, skipped = {}, []
    for setting in settings:
        apply_isr(meta, setting, pool)
        try:
            out[setting] = count_gflops(meta, size)
        except ValueError as e:
            log.info("ISR %s left out: %s", setting, e)
            skipped.append(setting)
    return out, skipped


def measure_latency(model: nn.Module, settings: Sequence[str], size: Sequence[int], *, runs: int = 3,
                    warmup: int = 1, pool: str | None = None) -> dict[str, float]:
    """Median milliseconds of one forward at ``size`` per setting on the model's device, the
    settings timed round-robin (:func:`edaformer.bench.time_interleaved`)."""
    device = next(model.parameters()).device
    previous = str(model.isr)
    x = make_input(1, size, device)
    forward = forward_fn(model, x, device, torch.float32)

    def call(setting: str) -> Callable[[], Any]:
        def run():
            apply_isr(model, setting, pool)
            return forward()
        return run

    was_training = model.training
    model.eval()
    try:
        timings = time_interleaved({s: call(s) for s in settings}, runs=runs, warmup=warmup, device=device)
    finally:
        apply_isr(model, previous, pool)
        model.train(was_training)
    return {s: 1e3 * t.median for s, t in timings.items()}


# -- the search ------------------------------------------------------------------------------------
def _better(a: Candidate, b: Candidate | None) -> bool:
    """Higher mIoU; ties to fewer GFLOPs, then the setting's name."""
    return b is None or (a.mIoU, -a.gflops, b.isr) > (b.mIoU, -b.gflops, a.isr)


def _within(c: Candidate, budget: Budget) -> bool:
    if budget.kind == "gflops":
        return c.gflops <= budget.value
    if budget.kind == "ms":
        if c.ms is None:
            raise ValueError(f"ISR {c.isr} has no latency: a latency budget needs every setting timed")
        return c.ms <= budget.value
    raise ValueError("a max_drop budget is decided by mIoU, not by cost")


def search(candidates: Sequence[Candidate], budget: Budget, score: Scorer) -> tuple[Candidate, Candidate]:
    """Fill ``mIoU`` (via ``score(setting)``) where it can decide and return ``(chosen, reference)``.

    The rules are those of the module docstring; ``candidates`` must hold ``1111-111``.
    """
    by_isr = {c.isr: c for c in candidates}
    if REFERENCE not in by_isr:
        raise ValueError(f"the candidates must include {REFERENCE}, the reference")

    def evaluate(c: Candidate) -> Candidate:
        if c.mIoU is None:
            c.mIoU = float(score(c.isr))
            log.info("ISR %s: mIoU %.2f  GFLOPs %.4g%s", c.isr, 100 * c.mIoU, c.gflops,
                     f"  {c.ms:.1f} ms" if c.ms is not None else "")
        return c

    reference = evaluate(by_isr[REFERENCE])
    best: Candidate | None = None
    if budget.kind == "max_drop":
        floor = reference.mIoU - budget.value / 100.0
        ordered = sorted(candidates, key=lambda c: (c.gflops, c.isr))
        for _, level in itertools.groupby(ordered, key=lambda c: c.gflops):
            passing = [c for c in map(evaluate, level) if c.mIoU >= floor - 1e-12]
            for c in passing:
                best = c if best is None or (c.mIoU, best.isr) > (best.mIoU, c.isr) else best
            if best is not None:
                break
    else:
        feasible = [c for c in candidates if _within(c, budget)]
        if not feasible:
            cheapest = min(candidates, key=lambda c: (c.ms if budget.kind == "ms" else c.gflops, c.isr))
            cost = f"{cheapest.ms:.1f} ms" if budget.kind == "ms" else f"{cheapest.gflops:.4g} GFLOPs"
            raise ValueError(f"no ISR setting of the grid meets the budget {budget}: the cheapest, {cheapest.isr}, "
                             f"needs {cost}")
        for c in sorted(feasible, key=lambda c: (-c.gflops, c.isr)):
            if _better(evaluate(c), best):
                best = c
    assert best is not None  # the reference always meets a max_drop budget
    return best, reference


def pareto_front(candidates: Sequence[Candidate], cost: str = "gflops") -> list[Candidate]:
    """The evaluated candidates no other beats on both cost (lower) and mIoU (higher), cheapest first."""
    def key(c: Candidate) -> float:
        value = getattr(c, cost)
        return math.inf if value is None else value

    front: list[Candidate] = []
    for c in sorted((c for c in candidates if c.mIoU is not None), key=lambda c: (key(c), -c.mIoU, c.isr)):
        if not front or c.mIoU > front[-1].mIoU:
            front.append(c)
    return front


# -- the evaluation protocol (the one place it is called) ------------------------------------------
def score_setting(model: nn.Module, dataset: Dataset, setting: str, eval_kwargs: Mapping[str, Any],
                  pool: str | None = None) -> float:
    """mIoU (a fraction) of ``model`` under ``setting`` on ``dataset``, by the evaluation protocol."""
    pool = pool if pool is not None else getattr(model, "isr_pool", None)
    previous = str(model.isr)
    apply_isr(model, setting, pool)
    try:
        return float(evaluate(model, dataset, isr=setting, pool=pool, **eval_kwargs)["mIoU"])
    except ValueError as e:
        raise ValueError(f"ISR {setting}: {e}") from None
    finally:
        apply_isr(model, previous, pool)


def tune_isr(model: nn.Module, dataset: Dataset, budget: Budget, *, settings: Sequence[str],
             flops_input_size: Sequence[int], eval_kwargs: Mapping[str, Any] | None = None,
             pool: str | None = None, runs: int = 3, warmup: int = 1, timer: Timer | None = None,
             score: Scorer | None = None) -> TuneResult:
    """Search ``settings`` for the best ISR setting of ``model`` within ``budget`` (module docstring).

    ``timer(model, settings) -> {setting: ms}`` replaces :func:`measure_latency` and ``score``
    replaces :func:`score_setting` (tests).
    """
    size = tuple(int(s) for s in flops_input_size)
    if pool is not None:
        apply_isr(model, str(model.isr), pool)  # a pool kind the model does not take fails here, first
    settings = list(dict.fromkeys(str(parse_isr(s)) for s in settings))
    if REFERENCE not in settings:
        settings.insert(0, REFERENCE)
    gflops, skipped = measure_gflops(model, settings, size, pool)
    if REFERENCE in skipped:
        raise ValueError(f"the input size {size[0]}x{size[1]} is too small for the model even at {REFERENCE}")
    candidates = [Candidate(s, gflops[s]) for s in settings if s in gflops]
    timer = timer or (lambda m, ss: measure_latency(m, ss, size, runs=runs, warmup=warmup, pool=pool))
    if budget.kind == "ms":
        log.info("timing %d ISR settings at %dx%d", len(candidates), *size)
        for c, ms in zip(candidates, _timed(timer, model, candidates)):
            c.ms = ms
    if score is None:
        kwargs = dict(eval_kwargs or {})
        score = lambda setting: score_setting(model, dataset, setting, kwargs, pool)  # noqa: E731
    chosen, reference = search(candidates, budget, score)
    result = TuneResult(budget, candidates, chosen, reference, size, skipped)
    untimed = [c for c in {c.isr: c for c in [*result.front, chosen, reference]}.values() if c.ms is None]
    if untimed:
        for c, ms in zip(untimed, _timed(timer, model, untimed)):
            c.ms = ms
    log.info("%d of %d ISR settings evaluated; chosen %s", len(result.evaluated), len(candidates), chosen.isr)
    return result


def _timed(timer: Timer, model: nn.Module, candidates: Sequence[Candidate]) -> list[float]:
    times = timer(model, [c.isr for c in candidates])
    return [float(times[c.isr]) for c in candidates]


# -- output ----------------------------------------------------------------------------------------
def format_pareto_table(result: TuneResult) -> str:
    """The Pareto table: setting, GFLOPs, ms, mIoU and its change vs ``1111-111`` (points)."""
    size = result.flops_input_size
    rows = [dict(r, mIoU=100 * r["mIoU"], change=100 * r["change"]) for r in result.table_rows()]
    gflops = f"GFLOPs @ {size[0]}x{size[1]}" if size else "GFLOPs"
    return format_table(rows, [("isr", "ISR", ""), ("gflops", gflops, ".4g"), ("ms", "ms", ".1f"),
                               ("mIoU", "mIoU", ".2f"), ("change", "change", "+.2f"), ("note", "", "")])


# -- the stored setting (read back by edaformer.meta.stored_isr) -------------------------------------
def default_write_path(checkpoint: str | os.PathLike, setting: str) -> Path:
    """``<checkpoint stem>-isr<setting>.pth`` beside the checkpoint."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}-isr{setting}.pth")


def write_isr_checkpoint(checkpoint: str | os.PathLike, result: TuneResult, path: str | os.PathLike | None = None,
                         pool: str | None = None) -> Path:
    """A copy of ``checkpoint`` whose ``meta`` stores the chosen setting (``isr``; ``isr_pool``
    with a pooling option) and how it was found (``isr_tune``); the original is never written."""
    checkpoint = Path(checkpoint)
    target = Path(path) if path is not None else default_write_path(checkpoint, result.chosen.isr)
    if target.exists() and target.resolve() == checkpoint.resolve():
        raise ValueError(f"--write {target} is the checkpoint itself; the tuned copy must be another file")
    obj = read_checkpoint(checkpoint)
    if not any(isinstance(obj.get(k), Mapping) for k in ("state_dict", "model", "module")):
        obj = {"state_dict": obj}  # a bare state dict: wrap it so that it can carry meta
    meta = dict(obj.get("meta") or {})
    meta[ISR] = result.chosen.isr
    if pool is not None:
        meta[ISR_POOL] = pool
    meta[ISR_TUNE] = dict(budget=f"{result.budget.kind} {result.budget.value:g}", mIoU=result.chosen.mIoU,
                            gflops=result.chosen.gflops, reference_mIoU=result.reference.mIoU,
                            flops_input_size=list(result.flops_input_size or ()))
    obj["meta"] = meta
    return save_checkpoint(obj, target)


def plot_result(result: TuneResult, path: str | os.PathLike, title: str = "") -> Path | None:
    """The evaluated settings and the Pareto front as a PNG (None without matplotlib)."""
    cost = "ms" if result.budget.kind == "ms" else "gflops"
    points = [asdict(c) for c in result.evaluated if getattr(c, cost) is not None]
    budget = result.budget.value if result.budget.kind != "max_drop" else None
    return plot_pareto(points, [asdict(c) for c in result.front], path, cost=cost, chosen=result.chosen.isr,
                       budget=budget, title=title)
