"""``edaformer configs``: the names of the shipped configs, or every config key with its default,
type and meaning."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import PRETRAINING, SEGMENTATION, UNSET, Key, configs_dir, list_configs
from .common import command


def add_parser(sub) -> None:
    p = command(sub, "configs", run, help="list the shipped configs, or every config key (--defaults)",
                description="List the configs shipped with the package. Their names work wherever a config "
                            "path does (`edaformer train edaformer-t-camvid --set data.root=...`) and as a "
                            "`_base_` of a config of your own; an existing file of the same name wins. "
                            "With --defaults: every key, section by section, with its default, type and meaning.")
    p.add_argument("--bases", action="store_true", help="also the _base_/ files (defaults and datasets)")
    p.add_argument("--paths", action="store_true", help="print each config's file beside its name")
    p.add_argument("--defaults", action="store_true",
                   help="print every config key with its default, type and meaning, grouped by section "
                        "('-': the dataset's or the model's own, given in brackets)")
    p.add_argument("--pretraining", action="store_true",
                   help="with --defaults: the keys of `edaformer pretrain` configs")


def show_value(value: Any) -> str:
    """A default as it is written in YAML (``null``, ``true``, ``[0.5, 2.0]``); ``-`` for UNSET."""
    if value is UNSET:
        return "-"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    return str(value)


def key_table(keys: Mapping[str, Mapping[str, Key]]) -> list[str]:
    """The lines of ``--defaults``: per section a header, then ``key  default  meaning (type: ...)``."""
    width = max(len(name) for section in keys.values() for name in section)
    shown = {(s, n): show_value(k.default) for s, section in keys.items() for n, k in section.items()}
    default_width = min(max(len(v) for v in shown.values()), 14)
    lines = []
    for section, section_keys in keys.items():
        lines.append(f"{section}:")
        for name, key in section_keys.items():
            lines.append(f"  {name:{width}s}  {shown[section, name]:{default_width}s}  {key.help} "
                         f"(type: {key.type.describe()})")
    return lines


def run(args) -> int:
    if args.defaults:
        print("\n".join(key_table((PRETRAINING if args.pretraining else SEGMENTATION).keys)))
        return 0
    names = list_configs(bases=args.bases)
    if not names:
        raise ValueError(f"no configs are shipped with this install (no *.yaml in {configs_dir()})")
    width = max(map(len, names))
    for name in names:
        print(f"{name:{width}s}  {configs_dir() / name}.yaml" if args.paths else name)
    return 0
