"""Helpers to use the reference fixtures in ../shared/fixtures/official and the scripts in benchmarks/."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import zlib
from functools import lru_cache
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("EDAFORMER_FIXTURES",
                               Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "official"))
requires_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"reference fixtures not found at {FIXTURES}")

MODELS = {"t": "edaformer-t-ade20k", "b": "edaformer-b-ade20k"}
SETTINGS = {"e1111_d111": "1111-111", "e2211_d222": "2211-222", "e2221_d222": "2221-222"}


def fill(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixtures' weight rule (crc32key-randn-fanin-v1)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.int64)
    if leaf == "running_mean":
        return 0.1 * torch.randn(shape, generator=g)
    if leaf == "running_var":
        return 0.5 + torch.rand(shape, generator=g)
    if leaf == "bias":
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1:
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * (1.0 / math.sqrt(math.prod(shape[1:])))


@lru_cache(maxsize=None)
def manifest(size: str) -> dict:
    return json.loads((FIXTURES / f"manifest_edaformer_{size}_ade.json").read_text())


def reference_state_dict(size: str) -> dict[str, torch.Tensor]:
    return {e["key"]: fill(e["key"], tuple(e["shape"])) for e in manifest(size)["state_dict"]}


@lru_cache(maxsize=None)
def expected_outputs(size: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / f"outputs_edaformer_{size}_ade.pt", map_location="cpu", weights_only=True)


def inputs() -> dict[str, torch.Tensor]:
    return {"x256": torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)),
            "x200x328": torch.randn(1, 3, 200, 328, generator=torch.Generator().manual_seed(1))}


def load_benchmark_module(name: str):
    """Import ``benchmarks/<name>.py`` as the top-level module ``name`` (as the scripts do)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
