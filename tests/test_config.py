"""Configs: ``_base_`` inheritance, overrides, the known keys and their types, the repository's files."""
import inspect

import pytest

import edaformer
from edaformer.config import (DEFAULTS, KEYS, UNSET, ConfigError, apply_overrides, configs_dir, load_config, load_yaml,
                              save_config, validate_config)

CONFIGS = configs_dir()
DEFAULT_YAML = CONFIGS / "_base_" / "default.yaml"
MINIMAL = "model: {name: edaformer-t-ade20k}\ndata: {type: folder, root: r}\nschedule: {iters: 1}\n"


def test_config_inheritance_overrides_and_save(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text(
        "optim: {lr: 1e-3, betas: [0.8, 0.9]}\nschedule: {iters: 100}\ndata: {type: folder, root: /r, crop_size: [8, 8]}\n")
    (tmp_path / "base" / "b.yaml").write_text("_base_: a.yaml\noptim: {weight_decay: 0.5}\nmodel: {name: edaformer-t-ade20k}\n")
    (tmp_path / "run.yaml").write_text("_base_: [base/b.yaml]\noptim: {betas: [0.7, 0.8]}\ndata: {batch_size: 3}\n")
    cfg = load_config(tmp_path / "run.yaml", ["optim.lr=2e-4", "data.root=/x", "eval.isr=2211-222",
                                              "train.amp=bf16", "data.crop_size=[16, 24]", "model.encoder_weights=null"])
    assert cfg["optim"] == {"lr": 2e-4, "betas": [0.7, 0.8], "eps": 1e-8, "weight_decay": 0.5, "decoder_lr_mult": 10.0,
                            "impl": "auto"}
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



def test_a_shipped_config_name_works_from_any_folder(tmp_path, monkeypatch):
    from edaformer.config import list_configs, resolve_config

    monkeypatch.chdir(tmp_path)
    names = list_configs()
    assert {f"edaformer-{s}-{d}" for s in "tb" for d in ("ade20k", "camvid", "cityscapes", "cocostuff")} <= set(names)
    assert "ablations/edaformer-t-camvid-dec123" in names and not any(n.startswith("_base_/") for n in names)
    assert "_base_/default" in list_configs(bases=True)
    for name in names:
        assert resolve_config(name) == CONFIGS / f"{name}.yaml"
    camvid = load_config(CONFIGS / "edaformer-t-camvid.yaml")
    assert load_config("edaformer-t-camvid") == load_config("edaformer-t-camvid.yaml") == camvid
    dec123 = load_config("ablations/edaformer-t-camvid-dec123", ["data.root=/data/camvid"])
    assert dec123["model"]["decoder_depths"] == [1, 2, 3] and dec123["data"]["root"] == "/data/camvid"
    with pytest.raises(FileNotFoundError,
                       match=r"config file not found: \S*nope \(nor a shipped config of that name: see "
                             r"`edaformer configs`\)"):
        load_config("nope")
    with pytest.raises(FileNotFoundError):
        load_config("../configs/edaformer-t-camvid")  # names stay inside the shipped folder


def test_a_file_wins_over_a_shipped_name_and_bases_take_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edaformer-t-camvid").write_text(MINIMAL)  # a file in the working folder named like a config
    assert load_config("edaformer-t-camvid")["model"]["num_classes"] is None
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "run.yaml").write_text("_base_: edaformer-t-camvid\ndata: {root: /data/camvid}\n")
    cfg = load_config(tmp_path / "mine" / "run.yaml")
    shipped = load_config("edaformer-t-camvid.yaml")
    assert cfg == {**shipped, "data": {**shipped["data"], "root": "/data/camvid"}}
    (tmp_path / "mine" / "edaformer-t-camvid").write_text(MINIMAL)  # beside the file: a relative path wins
    assert load_config(tmp_path / "mine" / "run.yaml")["model"]["num_classes"] is None
    (tmp_path / "mine" / "two.yaml").write_text("_base_: [_base_/default, _base_/camvid.yaml]\n"
                                                "model: {name: edaformer-t-ade20k}\nschedule: {iters: 5}\n")
    assert load_config(tmp_path / "mine" / "two.yaml")["data"]["classes"] == shipped["data"]["classes"]


def test_configs_command_lists_the_names(capsys):
    from edaformer.cli import main
    from edaformer.config import list_configs

    assert main(["configs"]) == 0
    assert capsys.readouterr().out.split() == list_configs()
    assert main(["configs", "--bases", "--paths"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(list_configs(bases=True))
    assert ["_base_/default", str(CONFIGS / "_base_" / "default.yaml")] in [line.split() for line in lines]
    assert lines[-1].startswith("_base_/")


@pytest.mark.parametrize("command", [["eval", "--checkpoint", "edaformer-t-camvid"],
                                     ["isr-tune", "--checkpoint", "edaformer-t-camvid", "--budget-gflops", "1"],
                                     ["train"]])
def test_commands_take_a_shipped_config_name(command, tmp_path, monkeypatch, capsys):
    from edaformer.cli import main

    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-camvid"
    argv = [command[0], "edaformer-t-camvid", *command[1:], "--device", "cpu", "--set", f"data.root={missing}"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"edaformer {command[0]}: error: dataset root does not exist: {missing}"


def test_repository_configs():
    assert load_yaml(DEFAULT_YAML) == DEFAULTS | {"schedule": DEFAULTS["schedule"] | {"iters": 160000}}
    files = sorted(CONFIGS.glob("edaformer-*.yaml"))
    assert {f.stem for f in files} >= {f"edaformer-{s}-{d}" for s in "tb"
                                       for d in ("ade20k", "cityscapes", "cocostuff", "camvid")}
    for f in files:
        cfg = load_config(f)
        if "camvid" in f.stem:  # from scratch: one rate for encoder and decoder
            assert cfg["optim"]["lr"] == 6e-4 and cfg["optim"]["decoder_lr_mult"] == 1
        else:  # the reference recipe (ImageNet encoder)
            assert cfg["optim"]["lr"] == 6e-5 and cfg["optim"]["decoder_lr_mult"] == 10
        assert cfg["model"]["name"] in edaformer.list_models()
    city_b = load_config(CONFIGS / "edaformer-b-cityscapes.yaml")
    assert city_b["data"]["batch_size"] == 1 and city_b["eval"]["mode"] == "slide"
    assert city_b["eval"]["stride"] == [768, 768] and city_b["data"]["crop_size"] == [1024, 1024]
    assert load_config(CONFIGS / "edaformer-t-cocostuff.yaml")["schedule"]["iters"] == 80000
    camvid = load_config(CONFIGS / "edaformer-t-camvid.yaml")
    assert camvid["model"]["num_classes"] == 11 and camvid["data"]["ignore_index"] == 11
    from edaformer.data.palettes import get_dataset_info

    info = get_dataset_info("camvid")
    assert tuple(camvid["data"]["classes"]) == info.classes
    assert tuple(map(tuple, camvid["data"]["palette"])) == info.palette


def _config(tmp_path, text=MINIMAL):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_key_in_a_file_names_the_file_and_the_closest_key(tmp_path):
    (tmp_path / "base.yaml").write_text(MINIMAL + "data: {type: folder, root: r, batchsize: 2}\n")
    (tmp_path / "run.yaml").write_text("_base_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key\(s\) in section 'data': "
                                          r"'batchsize' \(did you mean 'batch_size'\?\)"):
        load_config(tmp_path / "run.yaml")


@pytest.mark.parametrize("override, match", [
    ("model.drop_path=0.1", r"override 'model.drop_path=0.1': unknown key.*'drop_path' \(did you mean 'drop_path_rate'\?\)"),
    ("data.batch_size=two", r"override 'data.batch_size=two': data.batch_size must be an integer >= 1, got 'two'"),
    ("train.deterministic=1", r"train.deterministic must be true or false, got 1"),
    ("model.drop_path_rate=1.5", r"model.drop_path_rate must be a number in \[0, 1\), got 1.5"),
    ("data.crop_size=352,0", r"data.crop_size must be a positive integer or a pair \(h, w\) of them, got \[352, 0\]"),
    ("data.ratio_range=2,1", r"data.ratio_range must be two numbers low <= high"),
    ("optim.betas=0.9", r"optim.betas must be a list of 2 items"),
    ("data.palette=[[0,0,300]]", r"data.palette must be a list of \[r, g, b\] colours"),
    ("eval.isr=22-1", r"eval.isr must be an ISR setting"),
    ("train.amp=fp8", r"train.amp must be one of false, bf16, fp16 or null, got 'fp8'"),
    ("data.x.y=1", r"must look like section.key=value"),
    ("data.img_suffix=jpg", r"data.img_suffix must be a file ending such as '\.jpg' \(with its dot\), got 'jpg'"),
    ("data.ignore_index=300", r"data.ignore_index must be an integer in \[0, 255\], got 300"),
    ("nosection.x=1", r"unknown config section"),
])
def test_override_errors_name_the_override_key_type_and_value(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_config(tmp_path), [override])


def test_model_pretrained_is_refused_naming_model_encoder_weights(tmp_path):
    message = "model.pretrained was renamed: use model.encoder_weights"
    (tmp_path / "c.yaml").write_text(MINIMAL.replace("model: {name: edaformer-t-ade20k}",
                                                     "model: {name: edaformer-t-ade20k, pretrained: eft_t.pth}"))
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "c.yaml")
    assert str(error.value) == f"{tmp_path / 'c.yaml'}: {message}"
    (tmp_path / "base.yaml").write_text(MINIMAL)
    for value in ("eft_t.pth", "null"):
        with pytest.raises(ConfigError) as error:
            load_config(tmp_path / "base.yaml", [f"model.pretrained={value}"])
        assert str(error.value) == f"override 'model.pretrained={value}': {message}"
    with pytest.raises(ConfigError, match=f"^{message}$"):
        validate_config({**load_yaml(tmp_path / "base.yaml"), "model": {"name": "x", "pretrained": "eft_t.pth"}})
    # a config saved before the rename holds model.pretrained: null, the absent key
    saved = tmp_path / "saved.yaml"
    saved.write_text(MINIMAL.replace("model: {name: edaformer-t-ade20k}", "model: {name: edaformer-t-ade20k, "
                                                                           "pretrained: null}"))
    assert load_config(saved) == load_config(tmp_path / "base.yaml")
    assert load_config(saved)["model"]["encoder_weights"] is None
    assert validate_config(load_yaml(saved)) == load_config(saved)


def test_override_values_parse_for_the_key_type(tmp_path):
    cfg = load_config(_config(tmp_path), [
        "data.crop_size=352,480", "data.scale=960,360", "optim.betas=0.8,0.9", "eval.tta_scales=0.5, 1.0",
        "data.classes=sky,road", "data.root=2024", "model.encoder_weights=null", "optim.lr=1e-4",
        "eval.stride=[4, 8]", "model.dropout=0", "train.checkpoint_minutes=30", "data.crop_size=352,352"])
    data = cfg["data"]
    assert data["crop_size"] == [352, 352] and data["scale"] == [960, 360] and data["classes"] == ["sky", "road"]
    assert data["root"] == "2024"                                        # text as it is for a string key
    assert cfg["optim"]["betas"] == [0.8, 0.9] and cfg["optim"]["lr"] == 1e-4
    assert cfg["eval"]["tta_scales"] == [0.5, 1.0] and cfg["eval"]["stride"] == [4, 8]
    assert cfg["model"]["encoder_weights"] is None and cfg["model"]["dropout"] == 0.0
    assert cfg["train"]["checkpoint_minutes"] == 30


@pytest.mark.parametrize("overrides, match", [
    (["data.classes=a,b,c,d", "model.num_classes=11"],
     r"model.num_classes is 11 but data.classes names 4 classes: set model.num_classes to null"),
    (["data.classes=a,b", "data.palette=[[0,0,0]]"], r"data.palette has 1 colours but data.classes names 2 classes"),
    (["data.classes=5", "data.ignore_index=3"], r"data.ignore_index is 3, which is also a class id"),
])
def test_class_count_palette_and_ignore_value_agree(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_config(tmp_path), overrides)
    assert load_config(_config(tmp_path), ["data.classes=a,b,c,d", "model.num_classes=4", "data.ignore_index=4"])


def test_type_errors_in_a_file_name_the_file(tmp_path):
    path = _config(tmp_path, MINIMAL + "optim: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: optim.lr must be a number >= 0, got 'fast'"):
        load_config(path)
    path = _config(tmp_path, MINIMAL.replace("iters: 1", "iters: 1.5"))
    with pytest.raises(ConfigError, match=r"schedule.iters must be an integer >= 1 or null, got 1.5"):
        load_config(path)


def test_values_are_normalised(tmp_path):
    path = _config(tmp_path, MINIMAL + "optim: {decoder_lr_mult: 10}\neval: {crop_size: 64}\n")
    cfg = load_config(path, ["data.size_divisor=null", "data.classes=3"])
    assert cfg["optim"]["decoder_lr_mult"] == 10.0 and isinstance(cfg["optim"]["decoder_lr_mult"], float)
    assert cfg["eval"]["crop_size"] == [64, 64]
    assert cfg["data"]["classes"] == 3 and cfg["data"]["size_divisor"] is None
    assert "scale" not in cfg["data"]                                   # unset keys are not filled in


def test_apply_overrides_checks_before_merging():
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides({}, ["schedule.warmup=3"])
    assert apply_overrides({"data": None}, ["data.workers=0"]) == {"data": {"workers": 0}}


def _build_dataset_keys() -> set[str]:
    """The keys of the table in edaformer.data's docstring (first column, ``a/b`` and ``a, b`` split)."""
    import re

    from edaformer.data import __doc__ as doc

    rows = doc.split("\n=====")[2].split("\n=====")[0].splitlines()[1:]
    return {name for row in rows if row.strip()
            for name in re.split(r"[/,]\s*", re.split(r"\s{2,}", row.strip())[0])}


def test_key_table_matches_its_readers():
    """The model keys are create_model arguments / EDAFormerConfig fields, the data keys build_dataset's;
    defaults pass their type."""
    from edaformer.models import EDAFormerConfig, create_model

    accepted = set(EDAFormerConfig.keys()) | set(inspect.signature(create_model).parameters)
    assert set(KEYS["model"]) <= accepted | {"encoder_weights", "init_from"}
    documented = _build_dataset_keys()
    assert {"type", "root", "crop_size", "img_suffix", "seg_suffix", "classes", "palette"} <= documented
    assert documented <= set(KEYS["data"]), documented - set(KEYS["data"])
    for section, keys in KEYS.items():
        for name, key in keys.items():
            if key.default is not UNSET:
                assert key.type.check(key.default, name) == key.default, (section, name)


FINETUNE = CONFIGS / "ablations" / "edaformer-t-camvid-finetune-2222-222.yaml"


def test_finetune_recipe_starts_from_a_trained_model_at_raised_ratios():
    raw = load_yaml(FINETUNE)
    assert raw["model"]["init_from"].endswith("best_mIoU.pth") and raw["model"]["train_isr"] == "2222-222"
    cfg = load_config(FINETUNE)
    assert cfg["model"]["name"] == "edaformer-t-ade20k" and cfg["model"]["num_classes"] == 11
    assert cfg["schedule"]["iters"] == 250 and cfg["data"]["type"] == "folder"


def test_a_pretraining_config_given_to_train_points_to_pretrain():
    with pytest.raises(ConfigError, match=r"'mixup'.*a config for `edaformer pretrain`"):
        load_config("eft-t-imagenet")


# -- what each key means ------------------------------------------------------------------------
def test_every_key_has_a_one_line_meaning_and_a_readable_type():
    from edaformer.config import PRETRAIN_KEYS

    for keys in (KEYS, PRETRAIN_KEYS):
        for section, section_keys in keys.items():
            for name, key in section_keys.items():
                assert key.help.strip() and "\n" not in key.help and len(key.help) <= 120, (section, name)
                assert " object at 0x" not in repr(key) and key.type.describe() in repr(key)
    assert repr(KEYS["data"]["workers"].type) == "Int(an integer >= 0)"
    assert repr(KEYS["model"]["num_classes"]) == ("Key(default=None, type=Int(an integer >= 1 or null), "
                                                  "help=\"class count; null: the dataset's\")")


def test_default_yaml_comments_are_the_key_meanings():
    """Every key of _base_/default.yaml carries its meaning from the key table as its comment."""
    import re

    section, seen = None, 0
    for line in DEFAULT_YAML.read_text().splitlines():
        if re.match(r"^\w+:", line):
            section = line.split(":")[0]
        elif match := re.match(r"^  (\w+):.*?#\s(.*)$", line):
            assert match.group(2) == KEYS[section][match.group(1)].help, line
            seen += 1
        else:
            assert not re.match(r"^  \w+:", line), f"a key without its meaning: {line}"
    assert seen == sum(len(v) for v in DEFAULTS.values())


def test_configs_defaults_prints_every_key_grouped_by_section(capsys):
    from edaformer.cli import main
    from edaformer.cli.configs import show_value
    from edaformer.config import PRETRAIN_KEYS

    for argv, keys in ((["configs", "--defaults"], KEYS), (["configs", "--defaults", "--pretraining"], PRETRAIN_KEYS)):
        assert main(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line[:-1] for line in lines if not line.startswith(" ")] == list(keys)
        assert len(lines) == len(keys) + sum(len(v) for v in keys.values())
        rows = iter(lines)
        for section, section_keys in keys.items():
            assert next(rows) == f"{section}:"
            for name, key in section_keys.items():
                line = next(rows)
                assert line.split()[0] == name and line.split(None, 1)[1].startswith(show_value(key.default))
                assert line.endswith(f"  {key.help} (type: {key.type.describe()})"), line
    assert main(["configs", "--defaults"]) == 0
    out = capsys.readouterr().out
    assert "  crop_size            -               training crop (h, w) [512, 512] (type: a positive integer" in out
    assert "  betas                [0.9, 0.999]    AdamW betas" in out and "  workers              4  " in out


def test_an_ignore_index_inherited_while_the_classes_change_is_said(tmp_path, caplog):
    """The base's dataset marks 'ignore' with 11; a child with other classes is told which value is
    used and where it came from, unless it sets its own."""
    (tmp_path / "base.yaml").write_text(MINIMAL + "data: {type: folder, root: r, classes: 11, ignore_index: 11}\n")
    (tmp_path / "mine.yaml").write_text("_base_: base.yaml\ndata: {classes: [a, b, c, d]}\n")
    (tmp_path / "own.yaml").write_text("_base_: base.yaml\ndata: {classes: [a, b, c, d], ignore_index: 255}\n")
    caplog.set_level("WARNING", logger="edaformer")
    assert load_config(tmp_path / "mine.yaml")["data"]["ignore_index"] == 11
    assert caplog.text.count("data.ignore_index is 11, inherited from ") == 1
    assert f"inherited from {tmp_path / 'base.yaml'}, while data.classes (4 classes) is redefined by " \
           f"{tmp_path / 'mine.yaml'}: using 11 as the label value that means 'ignore'" in caplog.text
    assert "set data.ignore_index beside data.classes (255 if none)" in caplog.text
    caplog.clear()
    load_config(tmp_path / "own.yaml")
    load_config(tmp_path / "base.yaml")
    load_config("edaformer-t-camvid")  # classes and ignore value from one file
    assert caplog.text == ""
    load_config("edaformer-t-camvid", ["data.classes=4", "data.palette=null", "model.num_classes=null"])
    assert "(4 classes) is redefined by --set data.classes=4: using 11" in caplog.text
