"""The built wheel: installed into a fresh virtual environment outside the repository, it ships the
configs, so that names resolve from an empty folder."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from edaformer.config import list_configs, load_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list, cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(python, edaformer script, environment) of a venv that holds the wheel built from this checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    # build from a copy of what the build reads, so that it writes nothing into the repository
    source = tmp / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", tmp / "dist", "."], source)
    (wheel,) = (tmp / "dist").glob("edaformer-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], tmp)
    # torch & co. from the environment running the tests (itself possibly a venv, which a nested
    # venv's --system-site-packages does not see); as plain paths, so that no .pth file in them
    # (the editable install of this checkout) is run
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).strip()
    outer = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (Path(purelib) / "_outer_site_packages.pth").write_text("\n".join(outer) + "\n")
    script = venv / ("Scripts/edaformer.exe" if os.name == "nt" else "bin/edaformer")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return python, script, env


def test_the_installed_wheel_ships_the_configs(wheel_env, tmp_path):
    python, script, env = wheel_env
    empty = tmp_path / "empty"
    empty.mkdir()
    code = ("import json, edaformer; from edaformer.config import load_config; "
            "print(json.dumps([edaformer.__file__, load_config('edaformer-t-camvid')]))")
    listing = subprocess.Popen([str(script), "configs"], cwd=empty, env=env, stdout=subprocess.PIPE, text=True)
    where, cfg = json.loads(_run([python, "-c", code], empty, env))
    out, _ = listing.communicate(timeout=600)
    assert listing.returncode == 0
    names = out.split()
    assert "edaformer-t-camvid" in names and names == list_configs()
    assert Path(where).resolve().is_relative_to(python.parent.parent.resolve())  # the wheel's, not this checkout's
    assert cfg == load_config("edaformer-t-camvid")  # the _base_ chain resolved inside the installed package
    assert cfg["data"]["type"] == "folder" and cfg["schedule"]["iters"] == 3400 and len(cfg["data"]["classes"]) == 11
    assert not list(empty.iterdir())
