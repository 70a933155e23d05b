"""``edaformer configs``: the names of the shipped configs."""
from __future__ import annotations

from .common import command
from ..config import configs_dir, list_configs


def add_parser(sub) -> None:
    p = command(sub, "configs", run, help="list the shipped configs (names that work wherever a config path does)",
                description="List the configs shipped with the package. Their names work wherever a config "
                            "path does (`edaformer train edaformer-t-camvid --set data.root=...`) and as a "
                            "`_base_` of a config of your own; an existing file of the same name wins.")
    p.add_argument("--bases", action="store_true", help="also the _base_/ files (defaults and datasets)")
    p.add_argument("--paths", action="store_true", help="print each config's file beside its name")


def run(args) -> int:
    names = list_configs(bases=args.bases)
    if not names:
        raise ValueError(f"no configs are shipped with this install (no *.yaml in {configs_dir()})")
    width = max(map(len, names))
    for name in names:
        print(f"{name:{width}s}  {configs_dir() / name}.yaml" if args.paths else name)
    return 0
