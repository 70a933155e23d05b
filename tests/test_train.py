"""Configs and the eval CLI, on tiny folder datasets built in tmp_path."""
import json

import pytest
import torch

import edaformer
from edaformer.cli import main as cli_main
from edaformer.config import DEFAULTS, ConfigError, load_config, load_yaml, save_config
from training_data import CLASSES, DEFAULT_YAML, REPO, make_dataset, write_config


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast on a shared 2-core machine and the same math in every process."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- config -------------------------------------------------------------------------------------
def test_config_inheritance_overrides_and_save(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text(
        "optim: {lr: 1e-3, betas: [0.8, 0.9]}\nschedule: {iters: 100}\ndata: {type: folder, root: /r, crop_size: [8, 8]}\n")
    (tmp_path / "base" / "b.yaml").write_text("_base_: a.yaml\noptim: {weight_decay: 0.5}\nmodel: {name: edaformer-t-ade20k}\n")
    (tmp_path / "run.yaml").write_text("_base_: [base/b.yaml]\noptim: {betas: [0.7, 0.8]}\ndata: {batch_size: 3}\n")
    cfg = load_config(tmp_path / "run.yaml", ["optim.lr=2e-4", "data.root=/x", "eval.isr=2211-222",
                                              "train.amp=bf16", "data.crop_size=[16, 24]", "model.pretrained=null"])
    assert cfg["optim"] == {"lr": 2e-4, "betas": [0.7, 0.8], "eps": 1e-8, "weight_decay": 0.5, "decoder_lr_mult": 10.0}
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


def test_repository_configs():
    assert load_yaml(DEFAULT_YAML) == DEFAULTS | {"schedule": DEFAULTS["schedule"] | {"iters": 160000}}
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert {f.stem for f in files} >= {f"edaformer-{s}-{d}" for s in "tb"
                                       for d in ("ade20k", "cityscapes", "cocostuff", "camvid")}
    for f in files:
        cfg = load_config(f)
        assert cfg["optim"]["lr"] == 6e-5 and cfg["optim"]["decoder_lr_mult"] == 10
        assert cfg["model"]["name"] in edaformer.list_models()
    city_b = load_config(REPO / "configs" / "edaformer-b-cityscapes.yaml")
    assert city_b["data"]["batch_size"] == 1 and city_b["eval"]["mode"] == "slide"
    assert city_b["eval"]["stride"] == [768, 768] and city_b["data"]["crop_size"] == [1024, 1024]
    assert load_config(REPO / "configs" / "edaformer-t-cocostuff.yaml")["schedule"]["iters"] == 80000
    camvid = load_config(REPO / "configs" / "edaformer-t-camvid.yaml")
    assert camvid["model"]["num_classes"] == 11 and camvid["data"]["ignore_index"] == 11
    from edaformer.data.palettes import get_dataset_info

    info = get_dataset_info("camvid")
    assert tuple(camvid["data"]["classes"]) == info.classes
    assert tuple(map(tuple, camvid["data"]["palette"])) == info.palette


# -- eval CLI --------------------------------------------------------------------------------------
@pytest.fixture()
def eval_setup(tmp_path):
    data = make_dataset(tmp_path / "data", n=2, size=64)
    cfg_path = write_config(tmp_path / "e.yaml", data, size=64)
    torch.manual_seed(0)
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=4)
    ckpt = edaformer.save_checkpoint(model, tmp_path / "model.pth")
    return cfg_path, ckpt


def test_eval_cli_prints_metrics_and_class_table(eval_setup, capsys):
    cfg_path, ckpt = eval_setup
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu", "--isr", "2211-222"]) == 0
    out = capsys.readouterr().out
    assert "ISR 2211-222" in out and "aAcc" in out and "mIoU" in out and "mAcc" in out
    for name in CLASSES + ["| Class", "| mean"]:
        assert name in out
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu", "--mode", "slide",
                     "--set", "eval.crop_size=32"]) == 0
    assert "| mean" in capsys.readouterr().out


def test_isr_sweep_writes_json_and_plot(eval_setup, tmp_path, capsys):
    cfg_path, ckpt = eval_setup
    out_dir = tmp_path / "sweep"
    assert cli_main(["eval", str(cfg_path), "--checkpoint", str(ckpt), "--device", "cpu", "--isr-sweep",
                     "--out", str(out_dir)]) == 0
    text = capsys.readouterr().out
    result = json.loads((out_dir / "isr_sweep.json").read_text())
    rows = result["results"]
    assert [r["isr"] for r in rows] == ["1111-111", "1111-222", "2211-222", "2222-222"]
    assert rows[0]["delta_mIoU"] == 0.0 and all(0 <= r["mIoU"] <= 1 for r in rows)
    assert result["meta"]["flops_input_size"] == [64, 64]
    flops = [r["gflops"] for r in rows]
    if all(f is not None for f in flops):                       # edaformer.flops present
        assert flops == sorted(flops, reverse=True) and flops[0] > flops[-1]
    for r in rows:
        assert r["isr"] in text
    assert (out_dir / "isr_sweep.png").stat().st_size > 1000
